"""Host memory on Linux/glibc: huge pages for XLA:CPU's per-step buffers, and handing freed memory back.

Transparent huge pages, by restarting the program with glibc's malloc tunable set: XLA:CPU allocates each step's
temporary buffers afresh; glibc serves large blocks with mmap and returns them on free, so every step touches
fresh 4 KiB pages and pays a page fault for each. With GLIBC_TUNABLES=glibc.malloc.hugetlb=1, malloc asks the
kernel for 2 MiB pages on those mappings (madvise): a few hundred times fewer faults and a faster step (figures:
README, Benchmarks). glibc reads its tunables only at start-up, hence the restart.

Standard library only: call it before importing JAX. Set JAXNETS_HUGE_PAGES=0 to leave the program as started.

Compiling a large train step leaves the compiler's freed memory in malloc's heap, which the process keeps; the
step's own buffers then come on top. `release_freed_memory()` after compiling returns it and lowers the peak RSS
(README, Benchmarks).

Tracing a large train step makes hundreds of thousands of Python objects that outlive each garbage collection:
`collector_paused()` keeps the collector from scanning them again and again while it traces.
"""

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Iterator

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXNETS_HUGE_PAGES"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ: dict[str, str] | None = None, thp_setting_path: str = _THP_SETTING) -> bool:
    """Whether restarting with the tunable would change anything: Linux with glibc >= 2.35 (the first with
    glibc.malloc.hugetlb), transparent huge pages in "madvise" mode (in "always" mode every large mapping already
    gets them; in "never" none can), the tunable not yet set, and no JAXNETS_HUGE_PAGES=0."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT) == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or _glibc_version() < (2, 35):
        return False
    try:
        with open(thp_setting_path) as setting:
            return "[madvise]" in setting.read()
    except OSError:
        return False


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()
    except (ValueError, OSError, AttributeError):
        return ()


def restart_with_huge_pages() -> None:
    """Re-executes this Python program (same interpreter, options and arguments, same process id) with
    glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, when `wanted()`; otherwise returns at once."""
    if not wanted():
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def release_freed_memory() -> None:
    """glibc's malloc_trim(0): gives the heap's free pages back to the operating system. No-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's garbage collector off for the block, back as it was after it. Tracing Inception3's train step
    creates hundreds of thousands of objects that outlive each collection, which the collector then scans again
    and again: a quarter of the time to trace and lower it (README, "Why the code is as it is"). Cycles left
    meanwhile are collected once it is back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
