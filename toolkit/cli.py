"""What every command-line tool of the project shares: a mistake reported as one line, and output
files that appear whole or not at all.

Standard library only (and the pure-Python `mobilenet_arch`), so that every tool imports it the same
way, before either framework.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, NoReturn

from mobilenet_arch import Architecture, architecture


def fail(message: str, status: int = 2) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with `status`: 2 (argparse's) for
    bad input, 1 for a run that failed after it started."""
    one_line = " ".join(str(message).split())  # library messages may span lines
    print(f"error: {one_line}", file=sys.stderr)
    raise SystemExit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one `error: ...` line (exit 2) like every other
    bad input of the tools, instead of argparse's usage block; and no abbreviated flags, so that a
    mistyped one (`--epoch` for `--epochs`, `--opt` for `--optimizer`) is an error, not silently
    another flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def first_line(error: BaseException) -> str:
    """The gist of a library's error for a one-line message: its first sentence (PyTorch's run on
    for several), or the error's type where it says nothing."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def architecture_or_fail(arch: str, width_mult: float, num_classes: int = 1000) -> Architecture:
    """`mobilenet_arch.architecture(...)`, or its complaint (a width or class count out of range)
    as a one-line error."""
    try:
        return architecture(arch, width_mult, num_classes)
    except ValueError as e:
        fail(str(e))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], mode: int = 0o644) -> None:
    """Write `path` through `write(binary_file)` so that it appears whole or not at all.

    The bytes go to a temporary file in the destination's directory, which is renamed over `path`
    once complete: a run killed half-way leaves the previous file (or none), never a truncated one.
    `mode` is applied before the rename because `mkstemp` creates the file private (0600), and
    nothing this project writes is a secret.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), mode)
