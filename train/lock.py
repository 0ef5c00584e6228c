"""One run per workdir: `WORKDIR/.lock`, held by `flock` for the run's life.

    with lock.held(workdir):      # raises WorkdirBusy naming the process that holds it
        train(...)

Two runs in one workdir would write the same checkpoints and metrics (orbax then fails on its
own temporary directory, and every metrics row appears twice). The kernel releases an `flock`
when its process ends, however it ends (SIGKILL, a crash, a lost node), so the file a dead run
leaves never blocks its resume: only a live holder does. The file names the holder (pid, host);
it is removed when the run ends, and so is the workdir if the run made it and left it empty (its
set-up checks failed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock; the message names it."""


@contextlib.contextmanager
def held(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold `workdir`'s lock (creating the workdir) until the block ends or the process does."""
    workdir = Path(workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    while True:
        # "a+": opening must not truncate the holder's record before the lock is ours.
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirBusy(
                f"{workdir} is in use by a running train.main ({holder}): wait for it to end or stop it, "
                "or pass another --workdir"
            ) from None
        # The previous holder removes the file as it ends: a lock taken on the removed file is no
        # lock, take the new one.
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still held: see the check above
        f.close()
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote into it
                workdir.rmdir()
