"""The native depthwise kernels alone, on every depthwise layer of both models, on one thread
(`kernel_layers.cc`, which includes the library's source): `python -m bench.kernels`, or
`make kernel-bench`.

It is compiled with the library's own command (`flax_mobilenet.native._command`), as an executable
instead of a shared library, so that it times the same code with the same flags as training runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from toolkit.cli import ArgumentParser, fail

SOURCE = Path(__file__).with_name("kernel_layers.cc")


def build(output: Path) -> Path:
    """Compile kernel_layers.cc into the executable `output`."""
    from flax_mobilenet import native

    command = [arg for arg in native._command(output) if arg not in ("-shared", "-fPIC")]
    command[command.index(str(native.SOURCE))] = str(SOURCE)
    output.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        fail(f"compiling {SOURCE.name} failed ({' '.join(command)}): see the compiler's messages above", status=1)
    return output


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/kernel_layers"), help="where the executable goes (default: %(default)s)")
    args = parser.parse_args(argv)
    return subprocess.run([str(build(args.out).resolve())]).returncode


if __name__ == "__main__":
    sys.exit(main())
