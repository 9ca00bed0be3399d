"""One run per workdir: an advisory lock on `<workdir>/run.lock`, held by the run's first process while it trains.

The kernel drops a `flock` when its process dies (kill -9 included), so a lock is never left held by a process
that no longer exists; the file keeps the holder's process id and host, to name them when a second run is refused
and to warn when a run takes over from one that died without cleaning up. On NFS, Linux implements flock with the
server's locks, which a crashed node's lease releases after its timeout.
"""

import fcntl
import json
import os
import socket
import time
import warnings

LOCK_FILE = "run.lock"


class WorkdirBusy(Exception):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """`acquire()` takes the lock (raising WorkdirBusy if another process holds it), `close()` releases it; also a
    context manager."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.close()

    def acquire(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 (held open for as long as the lock is)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(file)
            file.close()
            raise WorkdirBusy(
                f"workdir {self.workdir!r} is in use by another run (process {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')}): wait for it to finish, stop it, "
                "or use another --workdir"
            ) from None
        previous = _read(file)
        if previous:
            # Left by a run that ended without releasing (killed, or its node crashed): the kernel freed the lock.
            warnings.warn(
                f"taking over {self.path} from process {previous.get('pid', '?')} on host {previous.get('host', '?')}, "
                "which no longer holds it (it was killed or its node went down)",
                stacklevel=2,
            )
        file.seek(0)
        file.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        file.write(json.dumps(holder) + "\n")
        file.flush()
        self._file = file
        return self

    def close(self) -> None:
        """Releases the lock (and empties the file: a clean release); does nothing if not held."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # an empty file: released cleanly
        self._file.flush()
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _read(file) -> dict:
    file.seek(0)
    text = file.read().strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?"}
