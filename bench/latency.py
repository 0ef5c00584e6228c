"""Inference latency of one model in each runtime it deploys to, side by side: `python -m bench.latency`.

    python -m bench.latency --out bench/latency_cpu.json          # the table in docs/speed.md
    python -m bench.latency --arch v2 --batch 1 --threads 2 --repeats 3   # a quick look

Runtimes: `jax` (the Flax model jitted, the backend's own implementations: the native kernels on
the CPU), `torch` (torch_ref eager, inference mode), `torch-compile` (`torch.compile` of it),
`onnxruntime` (the .onnx `python -m parity.export` writes), `onnxruntime-int8` (the .onnx that
`python -m parity.export --int8` writes, `parity.export.export_int8`, calibrated on
INT8_CALIBRATION_IMAGES random images: the speed of int8 kernels does not depend on the ranges),
`stablehlo` (the .stablehlo it writes, deserialized and jitted), `tflite` (the .tflite, in
LiteRT's interpreter) and `tflite-int8` (its full-integer form, calibrated as onnxruntime-int8;
both where the tflite extra is installed). One model per architecture, width
1.0, 1000 classes, random weights; each float32 file exported and checked against the Flax model
(`parity.export.export`) before it is timed.

Each thread count runs in a fresh process pinned to that many cores (`sched_setaffinity`, before
JAX or PyTorch start their thread pools, which size themselves by it), and each runtime is told
the count too (torch.set_num_threads, onnxruntime's intra-op threads, LiteRT's num_threads). In
it, per model and batch, every runtime is warmed up, then the runtimes take turns (`bench.timing`,
the order rotating): a repeat is the mean of back-to-back calls over REPEAT_SECONDS, the table
the median over repeats, in milliseconds per batch. A call runs the model on a batch already in
the runtime's layout (NHWC for jax and stablehlo, NCHW for the others) and waits for the logits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench import timing
from bench.cli import _csv, machine
from toolkit import allocator
from toolkit.cli import ArgumentParser, atomic_write_text, fail

RUNTIMES = ("jax", "torch", "torch-compile", "onnxruntime", "onnxruntime-int8", "stablehlo", "tflite", "tflite-int8")
# The file each exported runtime runs; its last suffix is its parity.export format.
SUFFIXES = {"onnxruntime": ".onnx", "onnxruntime-int8": ".int8.onnx", "stablehlo": ".stablehlo", "tflite": ".tflite", "tflite-int8": ".int8.tflite"}
INT8 = {"onnxruntime-int8", "tflite-int8"}
# Random weights and images: the int8 file's agreement with float32 means nothing here (the
# accuracy is tests/test_export_int8.py's), so the bench keeps it whatever it is and records it.
INT8_CALIBRATION_IMAGES = 16
INT8_HELD_OUT_IMAGES = 8
RESOLUTION = 224
NUM_CLASSES = 1000
# A repeat's calls run back to back for at least this long: a steady state, not one cold call.
REPEAT_SECONDS = 0.25
# The check before timing makes sure the file is the model (tests/test_export.py holds the exports to
# parity); random weights with randomised BatchNorm take float32 rounding to 1e-5 at small inputs.
CHECK_TOLERANCE = 1e-4


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected comma-separated positive integers (e.g. 1,8)")
    return values


def build_parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n")[:2]
    p = ArgumentParser(
        prog="python -m bench.latency", description=description, epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", type=_csv(("v1", "v2")), default=["v1", "v2"], help="comma-separated: v1,v2")
    p.add_argument("--batch", type=_positive_ints, default=[1, 8], help="comma-separated batch sizes (1,8)")
    p.add_argument("--threads", type=_positive_ints, default=[1, 2], help="comma-separated thread counts, each in a process on that many cores (1,2)")
    p.add_argument("--runtimes", type=_csv(RUNTIMES), default=None, help=f"comma-separated subset of {','.join(RUNTIMES)} (default: all installed)")
    p.add_argument("--resolution", type=int, default=RESOLUTION, help=f"input height and width ({RESOLUTION})")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per runtime (median reported)")
    p.add_argument("--out", help="write the rows and the machine's description as JSON here")
    return p


def installed_runtimes() -> list[str]:
    import importlib.util

    from parity.export import FORMATS

    def installed(runtime: str) -> bool:
        modules = FORMATS["." + SUFFIXES[runtime].rpartition(".")[2]].modules if runtime in SUFFIXES else ()
        return all(importlib.util.find_spec(m) is not None for m in modules)

    return [r for r in RUNTIMES if installed(r)]


# ---------------------------------------------------------------- the models, exported once


def prepare(folder: Path, archs: list[str], runtimes: list[str], resolution: int) -> dict[str, dict[str, float]]:
    """Each architecture's weights (`<arch>.msgpack`) and its exported files in `folder`, each
    checked against the Flax model; the check's relative L2 per architecture and runtime."""
    import parity
    from parity import export, int8
    from parity.random_weights import random_torch_model

    calibration = export.check_images(INT8_CALIBRATION_IMAGES, resolution, with_preprocessing=True, seed=1)
    held_out = export.check_images(INT8_HELD_OUT_IMAGES, resolution, with_preprocessing=True, seed=2)
    images = int8.Images(calibration, held_out, None, "random images")

    errors: dict[str, dict[str, float]] = {}
    for arch in archs:
        checkpoint = parity.load(random_torch_model(arch, 1.0, NUM_CLASSES))
        parity.save(checkpoint, folder / f"{arch}.msgpack")
        errors[arch] = {}
        for runtime in runtimes:
            path = folder / f"{arch}{SUFFIXES.get(runtime, '')}"
            if runtime in INT8:
                print(f"  exporting {arch} for {runtime} ...", file=sys.stderr, flush=True)
                _, verification = export.export_int8(checkpoint, path, images, resolution, tolerance=CHECK_TOLERANCE, min_agreement=0)
                errors[arch][runtime] = verification.relative_l2  # to the float32 file
            elif runtime in SUFFIXES:
                print(f"  exporting {arch} for {runtime} ...", file=sys.stderr, flush=True)
                errors[arch][runtime] = export.export(checkpoint, path, resolution, tolerance=CHECK_TOLERANCE)
    return errors


# ---------------------------------------------------------------- one call of each runtime


def _jax_call(checkpoint, x_nhwc: np.ndarray):
    import jax

    x = jax.device_put(x_nhwc)
    compiled = jax.jit(lambda variables, x: checkpoint.model.apply(variables, x, train=False)).lower(checkpoint.variables, x).compile()
    return lambda: jax.block_until_ready(compiled(checkpoint.variables, x))


def _stablehlo_call(data: bytes, x_nhwc: np.ndarray):
    import jax
    from jax import export

    x = jax.device_put(x_nhwc)
    compiled = jax.jit(export.deserialize(bytearray(data)).call).lower(x).compile()
    return lambda: jax.block_until_ready(compiled(x))


def _torch_call(checkpoint, x_nchw: np.ndarray, compile: bool):
    import torch

    import parity

    model = parity.load_torch(checkpoint)
    model = torch.compile(model) if compile else model
    x = torch.from_numpy(x_nchw)

    def call():
        with torch.inference_mode():
            model(x)

    return call


def _onnxruntime_call(data: bytes, x_nchw: np.ndarray, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"image": x_nchw})


def _tflite_call(data: bytes, x_nchw: np.ndarray, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    from parity.export import tflite_input

    interpreter = Interpreter(model_content=data, num_threads=threads)
    details = interpreter.get_input_details()[0]
    image, logits = details["index"], interpreter.get_output_details()[0]["index"]
    interpreter.resize_tensor_input(image, list(x_nchw.shape))
    interpreter.allocate_tensors()
    x_nchw = tflite_input(x_nchw, details)  # a full-integer file's int8 input, quantized once outside the timing

    def call():
        interpreter.set_tensor(image, x_nchw)
        interpreter.invoke()
        interpreter.get_tensor(logits)

    return call


def make_call(runtime: str, folder: Path, arch: str, checkpoint, x_nhwc: np.ndarray, threads: int):
    """A function that runs one batch in `runtime` and waits for the logits."""
    x_nchw = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    data = (folder / f"{arch}{SUFFIXES[runtime]}").read_bytes() if runtime in SUFFIXES else None
    if runtime == "jax":
        return _jax_call(checkpoint, x_nhwc)
    if runtime == "stablehlo":
        return _stablehlo_call(data, x_nhwc)
    if runtime in ("torch", "torch-compile"):
        return _torch_call(checkpoint, x_nchw, compile=runtime == "torch-compile")
    if runtime in ("onnxruntime", "onnxruntime-int8"):
        return _onnxruntime_call(data, x_nchw, threads)
    if runtime in ("tflite", "tflite-int8"):
        return _tflite_call(data, x_nchw, threads)
    raise ValueError(f"unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")


# ---------------------------------------------------------------- one process per thread count


def _measure(threads: int, folder: str, archs: list[str], batches: list[int], runtimes: list[str], resolution: int, repeats: int) -> list[dict]:
    """The rows of one thread count, in this (fresh) process."""
    allocator.keep_step_buffers()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    import torch

    import parity
    from parity.random_weights import random_batch

    torch.set_num_threads(threads)
    rows = []
    for arch in archs:
        checkpoint = parity.load(Path(folder) / f"{arch}.msgpack")
        for batch in batches:
            print(f"  {arch} batch {batch} on {threads} thread(s): setting up {', '.join(runtimes)} ...", file=sys.stderr, flush=True)
            x = random_batch(batch, resolution)
            calls = {runtime: make_call(runtime, Path(folder), arch, checkpoint, x, threads) for runtime in runtimes}
            seconds = timing.take_turns(calls, repeats, REPEAT_SECONDS)
            rows += [
                {"arch": arch, "resolution": resolution, "batch": batch, "threads": threads, "runtime": runtime, "median_ms": 1000 * statistics.median(s), "call_s": s}
                for runtime, s in seconds.items()
            ]
            print(markdown_table(rows[-len(runtimes) :]), file=sys.stderr, flush=True)
    return rows


def measure(threads: int, *args) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure, threads, *args).result()


# ---------------------------------------------------------------- the table


def markdown_table(rows: list[dict]) -> str:
    """One line per model, batch and thread count; a column per runtime, milliseconds per batch
    (the median), with the ratio to onnxruntime where it ran."""
    runtimes = [r for r in RUNTIMES if any(row["runtime"] == r for row in rows)]
    names = {
        "torch": "PyTorch eager",
        "torch-compile": "torch.compile",
        "jax": "JAX jit",
        "stablehlo": "StableHLO",
        "tflite": "TFLite",
        "onnxruntime": "onnxruntime",
        "onnxruntime-int8": "onnxruntime int8",
        "tflite-int8": "TFLite int8",
    }
    lines = ["| model | input | batch | threads | " + " | ".join(f"{names[r]} ms" for r in runtimes) + " |", "|---" * (4 + len(runtimes)) + "|"]
    keys = sorted({(row["arch"], row["resolution"], row["batch"], row["threads"]) for row in rows}, key=lambda k: (k[0], k[2], k[3], k[1]))
    for arch, resolution, batch, threads in keys:
        cells = {row["runtime"]: row["median_ms"] for row in rows if (row["arch"], row["resolution"], row["batch"], row["threads"]) == (arch, resolution, batch, threads)}
        reference = cells.get("onnxruntime")

        def cell(runtime: str) -> str:
            if runtime not in cells:
                return "-"
            ratio = cells[runtime] / reference if reference else None
            # Below 1 (faster than float32 onnxruntime: the int8 rows) a second digit tells 0.55 from 0.64.
            ratio = "" if ratio is None or runtime == "onnxruntime" else f" ({ratio:.2f}x)" if ratio < 1 else f" ({ratio:.1f}x)"
            return f"{cells[runtime]:.1f}{ratio}"

        lines.append(f"| {arch.upper()} | {resolution} | {batch} | {threads} | " + " | ".join(cell(r) for r in runtimes) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if max(args.threads) > cores:
        fail(f"--threads {max(args.threads)}: this process may use {cores} cores; choose at most {cores}")
    if args.repeats < 1:
        fail(f"--repeats {args.repeats}: expected at least 1")
    if args.resolution < 32:
        fail(f"--resolution {args.resolution} is below 32, the networks' total stride: use at least 32")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out}: its directory does not exist; create it or choose another path")
    available = installed_runtimes()
    runtimes = args.runtimes or available
    missing = [r for r in runtimes if r not in available]
    if missing:
        extra = "tflite" if "tflite" in missing else "deploy"
        fail(f"--runtimes {','.join(missing)}: not installed; pip install 'flax-mobilenet[{extra}]' or leave them out")
    from parity.export import ExportError

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores; runtimes {', '.join(runtimes)}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        try:
            errors = prepare(Path(folder), args.arch, runtimes, args.resolution)
        except ExportError as e:
            fail(str(e), status=1)
        started = time.perf_counter()
        rows = []
        for threads in args.threads:
            rows += measure(threads, folder, args.arch, args.batch, runtimes, args.resolution, args.repeats)
    print(markdown_table(rows))
    print(f"({time.perf_counter() - started:.0f} s; exported files' relative L2 to the Flax model (int8: to the float32 file): " + "; ".join(f"{a} " + ", ".join(f"{r} {e:.1g}" for r, e in errors[a].items()) for a in errors) + ")")
    if args.out:
        atomic_write_text(args.out, json.dumps({"machine": info, "check_relative_l2": errors, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
