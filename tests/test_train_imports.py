"""What each training module imports when imported (in a fresh interpreter): one framework at
most, as only `parity` may import both, and none for the command-line modules, which check their
flags before jax or torch is loaded."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import train

FRAMEWORKS = ("jax", "torch")
IMPORTS = {
    "train.config": (),
    "train.datasets": (),
    "train.param_groups": (),
    "train.main": (),
    "train.plan": (),
    "train.record": (),
    "train.loop": (),
    "train.periodic": (),
    "train.runners": (),  # the frameworks inside its runners
    "train.eval": (),
    "train.compare": (),
    "train.predict": (),
    "train.lock": (),
    "train.metrics": (),
    "train.augment": (),
    "train.folder": (),
    "train.checkpoint": ("jax",),
    "train.data": ("jax",),  # through grain
    "train.distributed": ("jax",),
    "train.optim": ("jax",),
    "train.step": ("jax",),
    "train.torch_step": ("torch",),
}


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_module_imports_its_framework_only(module):
    code = f"import sys, {module}; print(' '.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert tuple(result.stdout.split()) == IMPORTS[module]


def test_every_training_module_is_listed():
    assert {f"train.{m.name}" for m in pkgutil.iter_modules(train.__path__)} == set(IMPORTS)
