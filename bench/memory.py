"""Peak memory of a framework's training: the growth of peak RSS (VmHWM) from after the imports to
after set-up and three training steps, measured in a fresh process (so it includes compilation for
JAX and torch.compile). Linux only."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from bench import runners
from bench.runners import make_runner
from toolkit import allocator


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_rss_growth(framework: str, arch: str, resolution: int, batch: int, precision: str) -> float:
    """Peak RSS growth (MiB) over set-up, compilation and three steps, in this process.

    Read from /proc (VmHWM), not `ru_maxrss`: Linux carries `ru_maxrss` over exec, so a spawned
    child reports its parent's peak. Writing 5 to clear_refs resets VmHWM to the current RSS.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    runner = make_runner(framework, arch, resolution, batch, precision)
    for _ in range(3):
        runner.train()
    return (_status_kib("VmHWM") - before) / 1024


def _import_and_measure(framework: str, arch: str, resolution: int, batch: int, precision: str) -> float:
    allocator.keep_step_buffers()  # as in the process that measures speed
    import jax  # noqa: F401  (imported before the baseline: both frameworks' imports are not counted)
    import torch  # noqa: F401

    import train.step  # noqa: F401
    import train.torch_step  # noqa: F401

    if framework == "keras":
        runners.keras_module()

    return _peak_rss_growth(framework, arch, resolution, batch, precision)


def peak_memory_mib(framework: str, arch: str, resolution: int, batch: int, precision: str = "fp32") -> float:
    """Peak RSS growth (MiB) of one framework's set-up and first steps, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_import_and_measure, framework, arch, resolution, batch, precision).result()
