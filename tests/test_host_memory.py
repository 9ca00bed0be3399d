"""The restart with glibc's huge-page tunable: when it happens, that it keeps the process, and that it cuts faults;
the garbage collector's pause while a step traces."""

import gc
import os
import subprocess
import sys
import textwrap

import pytest

from jaxnets import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {REPO!r})
    from jaxnets import host_memory
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
    host_memory.restart_with_huge_pages()
""")


def thp_file(tmp_path, setting: str) -> str:
    path = tmp_path / "enabled"
    path.write_text(setting + "\n")
    return str(path)


@pytest.mark.skipif(host_memory._glibc_version() < (2, 35), reason="needs Linux with glibc >= 2.35")
def test_wanted_only_in_madvise_mode_and_when_not_set_or_refused(tmp_path):
    madvise = thp_file(tmp_path, "always [madvise] never")
    assert host_memory.wanted({}, madvise)
    assert host_memory.wanted({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, madvise)
    assert not host_memory.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, madvise)  # already restarted
    assert not host_memory.wanted({"JAXNETS_HUGE_PAGES": "0"}, madvise)
    assert not host_memory.wanted({}, thp_file(tmp_path, "[always] madvise never"))  # the kernel does it already
    assert not host_memory.wanted({}, thp_file(tmp_path, "always madvise [never]"))
    assert not host_memory.wanted({}, str(tmp_path / "missing"))


def run_child(env: dict) -> list[list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, "--flag", "value"], env=env, capture_output=True, text=True, check=True
    )
    return [line.split(" ", 2) for line in result.stdout.splitlines()]


def test_restart_keeps_process_arguments_and_other_tunables():
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "JAXNETS_HUGE_PAGES")}
    env["GLIBC_TUNABLES"] = "glibc.malloc.check=0"
    lines = run_child(env)
    if not host_memory.wanted(env):  # e.g. transparent huge pages set to "always" or "never" on this machine
        assert len(lines) == 1
        return
    assert len(lines) == 2, lines
    (pid, tunables, args), (pid_after, tunables_after, args_after) = lines
    assert pid_after == pid and args_after == args == "['--flag', 'value']"
    assert tunables == "glibc.malloc.check=0"
    assert tunables_after == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"


def test_opt_out_runs_once():
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    env["JAXNETS_HUGE_PAGES"] = "0"
    assert len(run_child(env)) == 1


FAULTS = textwrap.dedent("""
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):  # as XLA:CPU does with a step's temporary buffers: malloc, write, free
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)
        libc.free(buffer)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not host_memory.wanted({}), reason="transparent huge pages are not in madvise mode here")
def test_tunable_cuts_page_faults_of_large_buffers():
    """What the restart is for: 5 x 64 MB written afresh are 80k faults in 4 KiB pages, ~160 in 2 MiB pages."""
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    plain = int(subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True).stdout)
    env["GLIBC_TUNABLES"] = host_memory.TUNABLE
    huge = int(subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True).stdout)
    assert plain > 80_000 and huge < plain / 10, (plain, huge)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux")
def test_release_freed_memory_returns_the_heap():
    """malloc_trim after many small frees (as compilation leaves them) lowers the resident set."""
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from jaxnets import host_memory
        def rss_kb():
            return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
        blocks = [bytearray(1000) for _ in range(300_000)]  # ~300 MB of small heap blocks
        del blocks[:-1]  # free all but the last: the heap's top stays in use, so free() cannot shrink it
        before = rss_kb()
        host_memory.release_freed_memory()
        print(before, rss_kb())
    """)
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    before, after = map(
        int,
        subprocess.run(
            [sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True
        ).stdout.split(),
    )
    assert after < before - 200_000, (before, after)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_the_scripts_restart_themselves_with_huge_pages(tmp_path, script):
    # A sitecustomize module logs each interpreter start: the restart is a second start in the same process.
    probe, log = tmp_path / "probe", tmp_path / "starts.log"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import os\n"
        "with open(os.environ['JAXNETS_PROBE_LOG'], 'a') as f:\n"
        "    f.write(f\"{os.getpid()} {os.environ.get('GLIBC_TUNABLES', '-')}\\n\")\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "JAXNETS_HUGE_PAGES")}
    env.update(PYTHONPATH=str(probe), JAXNETS_PROBE_LOG=str(log))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, script, "--help"], cwd=root, env=env, capture_output=True, check=True)
    starts = [line.split() for line in log.read_text().splitlines()]
    if not host_memory.wanted(env):  # transparent huge pages "always" or "never" here: nothing to ask for
        assert len(starts) == 1
        return
    assert len(starts) == 2, starts
    (pid, tunables), (pid_after, tunables_after) = starts
    assert pid_after == pid and tunables == "-" and tunables_after == "glibc.malloc.hugetlb=1"


def test_the_collector_pauses_for_the_block_and_comes_back_as_it_was():
    with host_memory.collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), host_memory.collector_paused():
        raise RuntimeError("the trace failed")
    assert gc.isenabled()  # back on after an error too
    gc.disable()  # a program that turned it off keeps it off
    try:
        with host_memory.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
