"""glibc's malloc set up for training steps: a step's large buffers stay mapped between steps.

XLA:CPU allocates each execution's temporaries as one buffer (998 MB for V1 at 224, batch 16) from
a worker thread. glibc gives that thread an arena of its own, which serves a request that large with
a fresh `mmap` and unmaps it on `free`, so every 4 KiB page faults again on the next step: hundreds
of thousands of minor faults a step, paid in system CPU time (compare `/usr/bin/time -v` of a run
with and without FLAX_MOBILENET_MALLOC=default). PyTorch's large tensors go the same way. One
arena, no `mmap` and no trimming of the heap keep the buffer between steps, as a caching allocator
would. The cost: the process holds on to its peak heap (about one step's temporaries) instead of
returning it between steps.

A thread picks its arena at its first allocation, so this has to run before JAX or PyTorch start
their thread pools: the command-line tools call it first thing. It is the same as starting the
process with `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# FLAX_MOBILENET_MALLOC=default leaves malloc as the process started with it.
ENV_VAR = "FLAX_MOBILENET_MALLOC"

# mallopt's parameters (glibc's malloc.h). It takes an int, so the trim threshold tops out at 2 GiB.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_step_buffers() -> bool:
    """Sets glibc's malloc up as above; whether it was. Not where malloc is not glibc's, when
    FLAX_MOBILENET_MALLOC=default, or once JAX or PyTorch is imported (their threads have arenas
    already, and the process is someone else's: a test run, a notebook)."""
    if os.environ.get(ENV_VAR) == "default" or "jax" in sys.modules or "torch" in sys.modules:
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
