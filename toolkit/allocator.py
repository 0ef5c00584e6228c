"""glibc's malloc set up for training steps: a step's large buffers stay mapped between steps.

XLA:CPU allocates each execution's temporaries as one buffer (998 MB for V1 at 224, batch 16) from
a worker thread. glibc gives that thread an arena of its own, whose heaps are at most 64 MB: a
larger request is served by a fresh `mmap` whatever M_MMAP_MAX says, and unmapped on `free`, and
smaller ones are trimmed back to the kernel, so the pages fault again on the next step: tens to
hundreds of thousands of minor faults a step, paid in system CPU time. With one arena every thread
allocates from the main heap, which grows without that limit; with no `mmap` and no trimming the
buffer stays between steps, as a caching allocator would keep it. PyTorch's large tensors go the
same way. The cost: the process holds on to its peak heap (about one step's temporaries) instead of
returning it, and threads share one arena's lock.

A thread picks its arena at its first allocation, and JAX starts its thread pools with its backend,
not at `import jax`. So `import flax_mobilenet` sets this up (importing PyTorch before it does not
matter), and the command-line tools call it first thing, for their PyTorch runs too; it lives here,
with the standard library only, so that they can do so without importing JAX. Once other threads
have allocated (after a PyTorch computation, whose OpenMP threads take arenas of their own) it
comes too late and the faults stay: start such a process with `MALLOC_ARENA_MAX=1
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`, the same set-up, or import flax_mobilenet
first. FLAX_MOBILENET_MALLOC=default leaves malloc alone.
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
    """Sets glibc's malloc up as above; whether it was. Not where malloc is not glibc's or when
    FLAX_MOBILENET_MALLOC=default. Setting it again does nothing more."""
    if os.environ.get(ENV_VAR) == "default":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
