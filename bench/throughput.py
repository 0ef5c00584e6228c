"""Throughput of the real training and evaluation steps, the frameworks side by side: one row per
framework and configuration, with the medians over repeats (`bench.timing`), the compile time,
XLA's count of the compiled step's memory and, optionally, the peak RSS growth (`bench.memory`)."""

from __future__ import annotations

import statistics
import sys

from bench import memory, runners, timing

# Batch per resolution: on the CPU, small enough at 224 for a 2-core machine's patience.
CPU_BATCH = {224: 16, 32: 64}
ACCELERATOR_BATCH = {224: 256, 32: 256}


def run_config(
    arch: str, resolution: int, batch: int, frameworks: list[str], repeats: int, measure_memory: bool, precision: str = "fp32"
) -> list[dict]:
    """The rows of one model and input size, one per framework."""
    by_framework = {}
    for framework in frameworks:
        print(f"  setting up {framework} {arch} {resolution}px batch {batch} {precision} ...", file=sys.stderr, flush=True)
        by_framework[framework] = runners.make_runner(framework, arch, resolution, batch, precision)
    train_times = timing.take_turns({name: r.train for name, r in by_framework.items()}, repeats)
    infer_times = timing.take_turns({name: r.infer for name, r in by_framework.items()}, repeats)
    rows = [_row(arch, resolution, batch, precision, name, runner, train_times[name], infer_times[name]) for name, runner in by_framework.items()]
    del by_framework  # the models free their memory before the memory runs start
    if measure_memory:
        for row in rows:
            print(f"  peak memory of {row['framework']} in a fresh process ...", file=sys.stderr, flush=True)
            row["peak_rss_growth_mib"] = memory.peak_memory_mib(row["framework"], arch, resolution, batch, precision)
    return rows


def _row(arch, resolution, batch, precision, framework, runner, train_step_s, infer_step_s) -> dict:
    return {
        "arch": arch,
        "resolution": resolution,
        "batch": batch,
        "precision": precision,
        "framework": framework,
        "depthwise": getattr(runner, "depthwise", None),
        "train_images_per_s": batch / statistics.median(train_step_s),
        "infer_images_per_s": batch / statistics.median(infer_step_s),
        "train_step_s": train_step_s,
        "infer_step_s": infer_step_s,
        "compile_s": runner.compile_s,
        "xla_step_memory_mib": None if runner.xla_bytes is None else runner.xla_bytes / 2**20,
        "peak_rss_growth_mib": None,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    """The rows (as `run_config` gives them, or as read back from the JSON) as a Markdown table,
    each framework's throughput also as a ratio to PyTorch eager (NCHW and channels-last memory)
    and compiled on the same input."""
    lines = [
        "| model | res | batch | precision | framework | train img/s | infer img/s | train vs eager | train vs eager CL"
        " | train vs compile | infer vs eager | infer vs eager CL | compile s | peak RSS growth MiB | XLA step MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = [r for r in rows if (r["arch"], r["resolution"]) == (row["arch"], row["resolution"])]
        ref = {r["framework"]: r for r in same}
        eager, channels_last, compiled = ref.get("torch"), ref.get("torch-channels-last"), ref.get("torch-compile")
        ratio = lambda other, key: None if other is None else row[key] / other[key]  # noqa: E731
        name = row["framework"] + (f" ({row['depthwise']} dw)" if row["depthwise"] else "")
        lines.append(
            f"| {row['arch'].upper()} | {row['resolution']} | {row['batch']} | {row.get('precision', 'fp32')} | {name}"
            f" | {row['train_images_per_s']:.1f} | {row['infer_images_per_s']:.1f}"
            f" | {_ratio(ratio(eager, 'train_images_per_s'))} | {_ratio(ratio(channels_last, 'train_images_per_s'))}"
            f" | {_ratio(ratio(compiled, 'train_images_per_s'))} | {_ratio(ratio(eager, 'infer_images_per_s'))}"
            f" | {_ratio(ratio(channels_last, 'infer_images_per_s'))} | {_fmt(row['compile_s'], '.1f')}"
            f" | {_fmt(row['peak_rss_growth_mib'], '.0f')} | {_fmt(row['xla_step_memory_mib'], '.0f')} |"
        )
    return "\n".join(lines)
