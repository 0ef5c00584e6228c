"""`python -m train.compare WORKDIR_A WORKDIR_B [...] [--output FILE]`: both runs' curves in one PNG.

Reads each workdir's metrics.jsonl (a JAX run and a `--framework torch` run of the same flags,
say) and draws their training and eval losses and eval accuracy on shared axes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train import metrics
from train.config import Parser


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m train.compare", description="Draw the curves of several training runs in one PNG.")
    p.add_argument("workdirs", nargs="+", help="workdirs holding metrics.jsonl")
    p.add_argument("--output", default="compare.png", help="PNG to write")
    args = p.parse_args(argv)
    runs = {}
    for workdir in args.workdirs:
        rows = metrics.read(workdir)
        if not rows:
            print(f"train.compare: error: {workdir} has no {metrics.METRICS_FILE} rows: expected a training workdir", file=sys.stderr)
            return 2
        label = Path(workdir).resolve().name
        runs[label if label not in runs else str(workdir)] = rows
    metrics.plot(runs, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
