"""The speed a user's own program gets: `examples/plain_script.py` (a training and an inference
step written from the README alone, against the same steps in PyTorch) in fresh processes.

    python -m bench.plain                                  # V1, V2 at 224 and 32; 2 processes a column
    python -m bench.plain --arch v2 --resolution 32 --processes 1   # a quick look
    python -m bench.plain --torch-compile                  # and torch.compile (minutes to compile)

Columns: `import flax_mobilenet` as is (it sets glibc's malloc up, docs/speed.md "Memory
allocator"), and with FLAX_MOBILENET_MALLOC=default (malloc left alone: what the same script got
before). The processes of the columns alternate, so that a slow spell of a shared machine hits
both; the table gives, per column, the median over processes of each process's medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.cli import _csv, _resolutions
from bench.throughput import CPU_BATCH
from toolkit.cli import ArgumentParser, atomic_write_text, fail

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "plain_script.py"
COLUMNS = {"as is": {}, "FLAX_MOBILENET_MALLOC=default": {"FLAX_MOBILENET_MALLOC": "default"}}


def build_parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n")[:2]
    p = ArgumentParser(prog="python -m bench.plain", description=description, epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=_csv(("v1", "v2")), default=["v1", "v2"], help="comma-separated: v1,v2")
    p.add_argument("--resolution", type=_resolutions, default=[224, 32], help="comma-separated input sizes (224,32; batch 16 at 224, 64 at 32)")
    p.add_argument("--batch", type=int, help="batch size (default: 16 at 224, 64 at 32)")
    p.add_argument("--processes", type=int, default=2, help="fresh processes per column and case (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timings per framework in each process (default: %(default)s)")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (its compile takes minutes at 224)")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def run_script(arch: str, resolution: int, batch: int, repeats: int, torch_compile: bool, env: dict) -> dict:
    command = [sys.executable, str(SCRIPT), "--arch", arch, "--resolution", str(resolution), "--batch", str(batch), "--repeats", str(repeats)]
    if torch_compile:
        command.append("--torch-compile")
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        fail(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.processes < 1 or args.repeats < 1 or (args.batch is not None and args.batch < 1):
        fail("--processes, --repeats and --batch: expected at least 1")
    rows = []
    for arch in args.arch:
        for resolution in args.resolution:
            batch = args.batch or CPU_BATCH.get(resolution, 16)
            results = {column: [] for column in COLUMNS}
            for index in range(args.processes):
                columns = list(COLUMNS)[index % 2 :] + list(COLUMNS)[: index % 2]
                for column in columns:
                    results[column].append(run_script(arch, resolution, batch, args.repeats, args.torch_compile, COLUMNS[column]))
            for column, found in results.items():
                row = {"arch": arch, "resolution": resolution, "batch": found[0]["batch"], "column": column, "processes": len(found)}
                for key in found[0]:
                    if key.endswith("_img_s"):
                        row[key] = statistics.median(r[key] for r in found)
                rows.append(row)
                print(_line(row), flush=True)
    print(markdown_table(rows))
    if args.out:
        atomic_write_text(args.out, json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _line(row: dict) -> str:
    return f"{row['arch']} {row['resolution']} {row['column']}: " + ", ".join(f"{k[:-6]} {v:.1f}" for k, v in row.items() if k.endswith("_img_s"))


def markdown_table(rows: list[dict]) -> str:
    """JAX's images/s and its ratio to each PyTorch step the rows have (eager in NCHW memory,
    eager in channels-last memory, compiled), training and inference."""
    others = [name for name in ("torch", "torch-channels-last", "torch-compile") if any(f"{name}_train_img_s" in r for r in rows)]
    label = {"torch": "eager", "torch-channels-last": "eager channels-last", "torch-compile": "compiled"}
    head = ["model", "input", "batch", "malloc"]
    for kind in ("train", "infer"):
        head += [f"JAX {kind} img/s"] + [f"{kind} vs {label[name]}" for name in others]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["arch"].upper(), str(r["resolution"]), str(r["batch"]), r["column"]]
        for kind in ("train", "infer"):
            jax_rate = r[f"jax_{kind}_img_s"]
            cells.append(f"{jax_rate:.1f}")
            cells += [f"{jax_rate / r[f'{name}_{kind}_img_s']:.2f}x" if f"{name}_{kind}_img_s" in r else "" for name in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
