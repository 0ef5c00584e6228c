"""What the test files build once per pytest session and share, pytest-xdist's workers included
(a trained run, a folder of images, a lowering of every step).

    from tests.shared import built_once, locked, session_dir
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path


def session_dir(tmp_path_factory) -> Path:
    """A directory shared by every test of this pytest session, pytest-xdist workers included."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextlib.contextmanager
def locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`session_dir/name`, made by `build(path)` by the first worker that asks and shared by all."""
    root = session_dir(tmp_path_factory) / name
    with locked(root.with_suffix(".lock")):
        if not root.with_suffix(".complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            build(root)
            root.with_suffix(".complete").touch()
    return root
