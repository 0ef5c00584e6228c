"""train.malloc: a large buffer freed by a worker thread stays mapped, so the next step's buffer of
the same size costs no page faults. Each case runs in a fresh process (malloc's set-up is
per process and has to come before other threads allocate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUFFER = 256 << 20
PAGES = BUFFER // 4096

# A worker thread that lives across steps (as XLA:CPU's pool does) allocates one large buffer per
# step, writes every byte and frees it; the minor page faults of the last two steps are reported.
PROBE = f"""
import ctypes, json, resource, sys
from concurrent.futures import ThreadPoolExecutor
from train import malloc
applied = malloc.keep_step_buffers() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def step():
    buffer = libc.malloc({BUFFER})
    ctypes.memset(buffer, 1, {BUFFER})
    libc.free(buffer)

with ThreadPoolExecutor(1) as pool:
    pool.submit(step).result()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pool.submit(step).result()
    pool.submit(step).result()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"applied": applied, "faults_per_step": faults / 2}}))
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc only"
)


def _probe(mode: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, env=os.environ | env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@linux_glibc
def test_a_freed_step_buffer_is_reused_without_page_faults():
    result = _probe("tune")
    assert result["applied"]
    # Writing the same 65,536 pages again after the set-up: only pages the heap had to grow by
    # may fault (none, once the first step has grown it); 1% leaves room for malloc's bookkeeping.
    assert result["faults_per_step"] < PAGES / 100, result


@linux_glibc
def test_without_it_every_page_of_the_buffer_faults_again():
    # The control that shows the probe measures what the set-up changes. Transparent huge pages
    # set to "always" would map 2 MiB at a fault and hide the difference.
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages are 'always' here: faults come 512 pages at a time")
    result = _probe("default")
    assert result["faults_per_step"] > PAGES / 2, result


def test_opting_out_leaves_malloc_alone():
    assert _probe("tune", FLAX_MOBILENET_MALLOC="default")["applied"] is False


def test_not_applied_once_jax_is_imported():
    # A notebook or a test run that imported JAX owns the process; its threads have arenas already.
    code = "import jax; from train import malloc; print(malloc.keep_step_buffers())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
