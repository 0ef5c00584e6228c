"""Each package imports only its own framework (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("mobilenet_arch", ["torch", "jax", "flax"]),
        ("flax_mobilenet", ["torch"]),
        ("flax_mobilenet.summary", ["torch"]),
        ("torch_ref", ["jax", "flax", "torchvision"]),
    ],
)
def test_package_does_not_import_the_other_framework(package, forbidden):
    code = f"import sys, importlib; importlib.import_module({package!r}); print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
