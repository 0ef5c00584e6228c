"""Throughput of the real training and evaluation steps, JAX against PyTorch, measured side by side.

    python -m bench --out bench.json                                   # V1 and V2 at 224 and 32: jax, torch (NCHW, channels-last), torch-compile
    python -m bench --arch v2 --resolution 32 --repeats 3 --no-memory  # a quick look
    python -m bench --frameworks jax,jax-xla-dw,torch                  # the native depthwise kernels against XLA's
    python -m bench --frameworks jax,torch,torch-compile,keras         # with Keras 3 on JAX, the nearest JAX peer
    python -m bench --depthwise                                        # the 3x3 depthwise layer alone
    python -m bench --arch v2 --resolution 224 --precision bf16        # on a GPU: batch 256, AMP

What is timed and how: `bench.runners` (the frameworks and their steps), `bench.timing` (turns and
medians), `bench.memory` (peak RSS), `bench.depthwise` (the layer alone). The machine's description
goes with the rows into the JSON of --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

from bench import depthwise, runners, throughput
from toolkit import allocator
from toolkit.cli import ArgumentParser, atomic_write_text, fail


def _csv(allowed: tuple, cast=str):
    def parse(text: str) -> list:
        values = [cast(v) for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected a comma-separated subset of {', '.join(map(str, allowed))}")
        return values

    return parse


def _resolutions(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 32 for v in values):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected comma-separated input sizes of at least 32 (e.g. 224,32)")
    return values


def _batches(by_resolution: dict[int, int]) -> str:
    return " and ".join(f"{batch} at {resolution}" for resolution, batch in by_resolution.items())


def build_parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n")[:2]
    p = ArgumentParser(
        prog="python -m bench", description=description, epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", type=_csv(("v1", "v2")), default=["v1", "v2"], help="comma-separated: v1,v2")
    p.add_argument("--resolution", type=_resolutions, default=[224, 32], help="comma-separated input sizes (224,32)")
    p.add_argument("--frameworks", type=_csv(runners.FRAMEWORKS), default=list(runners.DEFAULT_FRAMEWORKS), help=f"comma-separated subset of {','.join(runners.FRAMEWORKS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per framework (median reported)")
    p.add_argument("--batch", type=int, default=None, help=f"batch size for every resolution (default: {_batches(throughput.CPU_BATCH)} on the CPU, {_batches(throughput.ACCELERATOR_BATCH)} on an accelerator)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: bfloat16 compute with float32 parameters in JAX, AMP (autocast bf16) with channels-last memory in PyTorch")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs (one fresh process per row)")
    p.add_argument("--depthwise", action="store_true", help=f"benchmark the depthwise layer alone instead ({depthwise.SHAPE})")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def machine() -> dict:
    import jax
    import torch

    from flax_mobilenet import native
    from flax_mobilenet.depthwise import ENV_VAR

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "depthwise_env": os.environ.get(ENV_VAR),
        # 32 with AVX-512, 16 with AVX2: the native kernels' tiles and the dense kernel's use differ.
        "native_vector_registers": native.vector_registers() if jax.default_backend() == "cpu" else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tuned_malloc = allocator.keep_step_buffers()  # before JAX and PyTorch start their threads
    if args.repeats < 1:
        fail(f"--repeats {args.repeats}: expected at least 1")
    if args.batch is not None and args.batch < 1:
        fail(f"--batch {args.batch}: expected at least 1")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out}: its directory does not exist; create it or choose another path")
    info = machine() | {"malloc": "keep_step_buffers" if tuned_malloc else "default"}
    registers = f", native kernels for {info['native_vector_registers']} vector registers" if info["native_vector_registers"] else ""
    print(f"machine: {info['cpu']}, {info['cores']} cores{registers}; jax {info['jax_backend']}, torch {info['torch_device']}; malloc {info['malloc']}", flush=True)
    if args.depthwise:
        rows = depthwise.depthwise_microbench(args.repeats)
        print(depthwise.depthwise_table(rows))
        payload = {"machine": info, "depthwise": rows}
    else:
        batches = throughput.CPU_BATCH if info["jax_backend"] == "cpu" else throughput.ACCELERATOR_BATCH
        rows = []
        for arch in args.arch:
            for resolution in args.resolution:
                batch = args.batch or batches.get(resolution, 16)
                rows += throughput.run_config(arch, resolution, batch, args.frameworks, args.repeats, args.memory, args.precision)
                print(throughput.markdown_table(rows[-len(args.frameworks) :]), file=sys.stderr, flush=True)
        print(throughput.markdown_table(rows))
        payload = {"machine": info, "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    return 0
