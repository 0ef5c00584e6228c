"""`python -m train.compare WORKDIR_A WORKDIR_B [...] [--output FILE]`: both runs' curves in one PNG.

Reads each workdir's metrics.jsonl (a JAX run and a `--framework torch` run of the same flags,
say) and draws their training and eval losses and eval accuracy on shared axes. Every input is
checked before anything is drawn: a bad one gives one line on stderr, exit 2, and no output file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkit.cli import ArgumentParser, fail
from train import metrics


def runs_or_problem(workdirs: list[str]) -> tuple[dict[str, list[dict]], str | None]:
    """{label: metrics rows} for each workdir, or why one of them is not a training workdir."""
    runs: dict[str, list[dict]] = {}
    for workdir in workdirs:
        if not Path(workdir).is_dir():
            return {}, f"{workdir}: no such directory: expected a training workdir"
        # metrics.read skips a partial last line; rows without a step are not this project's.
        rows = [r for r in metrics.read(workdir) if isinstance(r, dict) and "step" in r]
        if not rows:
            return {}, f"{workdir} has no {metrics.METRICS_FILE} rows: expected a training workdir"
        label = Path(workdir).resolve().name
        runs[label if label not in runs else str(workdir)] = rows
    return runs, None


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m train.compare",
        description="Draw the curves of several training runs in one PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("workdirs", nargs="+", help="workdirs holding metrics.jsonl")
    p.add_argument("--output", default="compare.png", help="PNG to write")
    args = p.parse_args(argv)
    output = Path(args.output)
    runs, problem = runs_or_problem(args.workdirs)
    if problem is None and output.is_dir():
        problem = f"--output {output} is a directory: expected a PNG file name"
    elif problem is None and not output.parent.is_dir():
        problem = f"--output {output}: directory {output.parent} does not exist"
    if problem:
        fail(problem)
    try:
        metrics.plot(runs, output)  # atomic: nothing is left behind when it fails
    except OSError as e:
        fail(f"cannot write {output}: {e.strerror or e}", status=1)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
