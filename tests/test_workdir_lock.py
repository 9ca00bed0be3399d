"""One run per workdir: a second run is refused before it writes anything; a dead holder's lock is taken over."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, TINY, cli_args, finish, run_script, start_paused
from jaxnets.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirBusy, match=rf"process {os.getpid()} on host {socket.gethostname()}.*--workdir"):
            WorkdirLock(str(tmp_path)).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly
    with WorkdirLock(str(tmp_path)):  # and free again
        pass


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    holder = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from jaxnets.workdir_lock import WorkdirLock
        lock = WorkdirLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusy):
        WorkdirLock(str(tmp_path)).acquire()
    process.send_signal(signal.SIGKILL)  # no clean-up: the kernel drops the flock, the file still names it
    process.wait()
    with pytest.warns(UserWarning, match=rf"taking over .*run.lock from process {process.pid} on host"):
        lock = WorkdirLock(str(tmp_path)).acquire()
    lock.close()


@pytest.mark.slow
def test_a_second_train_py_on_a_busy_workdir_is_refused_and_the_first_goes_on(tmp_path, data_dir):
    workdir = tmp_path / "run"
    args = cli_args(**TINY, workdir=workdir, data_dir=data_dir)
    first = start_paused(args, step=2)  # the first run is mid-epoch, holding the workdir
    before = sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    second = run_script("train.py", *args)
    assert second.returncode == 2, second.stderr[-3000:]
    message = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and f"process {first.pid} on host {socket.gethostname()}" in message[0]
    assert "use another --workdir" in message[0] and "Traceback" not in second.stderr
    assert sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before
    first.send_signal(signal.SIGTERM)  # the first run was untouched: it saves and resumes as usual
    code, _, err = finish(first)
    assert code == 143, err[-3000:]
    resumed = run_script("train.py", *args)
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr[-3000:]
