"""GPU and TPU readiness without a device: the jitted train and eval steps, in float32 and
bfloat16, lower for `cuda`, `rocm` and `tpu` from this CPU-only machine, with XLA's own
convolutions and none of the native CPU kernels' custom calls, and the data-parallel step reduces
BatchNorm's statistics over the batch.

What a GPU or TPU compiles is decided per platform at lowering time, not by the host that traces:
the native kernels are JAX primitives with a portable lowering (XLA's operations) besides their
CPU one, and the pure-JAX forms that only pay on the CPU (the shifted depthwise form the CPU runs
in bfloat16, the stem's patches) are chosen by platform too (`backend.on_cpu`). This checks that
nothing CPU-only leaks into another platform's program, and that the CPU's own program keeps them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shared import built_once

PLATFORMS = ("cuda", "rocm", "tpu")
DTYPES = ("float32", "bfloat16")
DEVICES = 8

# Runs in a process of its own: the 8 simulated devices must be set before JAX starts.
SCRIPT = r"""
import json, re, sys
import jax, jax.numpy as jnp, optax
import mobilenet_arch
from flax_mobilenet import create_model
from train import distributed, step as step_lib

def convolutions(text):
    return [int(g) for g in re.findall(r"stablehlo\.convolution.*?feature_group_count = (\d+)", text)]

def stem_convolutions(text, channels):
    # The stem's forward: the 3-channel image, a (3, 3, 3, channels) kernel, groups 1.
    kernel = rf"tensor<3x3x3x{channels}x\w+>"
    return len(re.findall(rf"stablehlo\.convolution.*feature_group_count = 1 : i64.*: \(tensor<16x32x32x3x\w+>, {kernel}\)", text))

def custom_calls(text):
    return sorted(set(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text)))

result = {}
for arch, width in (("v1", 0.25), ("v2", 0.35)):
    entry = {"lowered": {}}
    for dtype in ("bfloat16", "float32"):
        model = create_model(arch, width, 10, dtype=jnp.dtype(dtype))
        layers = [l for b in model.architecture.blocks for l in b.layers]
        entry.update(depthwise=[l.in_channels for l in layers if l.depthwise], norms=[l.out_channels for l in layers])
        state = step_lib.create_train_state(model, optax.sgd(0.1, 0.9), jax.random.key(0), 32)
        batch = {"image": jnp.zeros((16, 32, 32, 3)), "label": jnp.zeros((16,), jnp.int32)}
        key = jax.random.key(1)
        mesh = distributed.make_mesh()
        steps = {"one": step_lib.jit_steps(0.0), "mesh": step_lib.jit_steps(
            0.0, distributed.replicated(mesh), distributed.batch_sharded(mesh))}
        for layout, (train, evaluate) in steps.items():
            traced = {"train": train.trace(state, batch, key), "eval": evaluate.trace(state, batch)}
            for platform in ("cpu", *sys.argv[1:]):
                for name, t in traced.items():
                    text = t.lower(lowering_platforms=(platform,)).as_text()
                    entry["lowered"][f"{dtype}/{layout}/{platform}/{name}"] = {
                        "convolutions": convolutions(text), "custom_calls": custom_calls(text),
                        "stem_convolutions": stem_convolutions(text, layers[0].out_channels),
                        "image_sharded": bool(re.search(r'tensor<16x32x32x3xf32> \{[^}]*sdy\.sharding<@mesh, \[\{"data"\}', text)),
                    }
    # SPMD partitioning is the same for every platform and dtype; here it runs for the CPU's 8
    # devices, on the float32 step (the last dtype's).
    hlo = steps["mesh"][0].trace(state, batch, key).lower().compile().as_text()
    reduced = []
    for line in hlo.splitlines():
        if " all-reduce(" in line or " all-reduce-start(" in line:
            shapes = line.split(" all-reduce")[0].split("=", 1)[1]
            size = 0
            listed = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
            if listed:
                size = len(listed.group(1).split(","))
            meshed = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
            if meshed:  # the iota form: mesh['axis_0'=8,...] {'axis_0'}, the product of the axes named
                axes = dict(re.findall(r"'(\w+)'=(\d+)", meshed.group(1)))
                size = 1
                for axis in re.findall(r"'(\w+)'", meshed.group(2)):
                    size *= int(axes[axis])
            reduced += [(int(n), size) for n in re.findall(r"f32\[(\d+)\]", shapes)]
    entry["all_reduced"] = reduced
    result[arch] = entry
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="session")
def lowered(tmp_path_factory) -> dict:
    # One lowering of every step per pytest run, shared by pytest-xdist's workers: each that runs a
    # test of this file would otherwise lower every step again, the suite's costliest set-up.
    def lower(folder: Path) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-c", SCRIPT, *PLATFORMS], env=env, cwd=root,
                             capture_output=True, text=True, timeout=900)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        folder.mkdir()
        (folder / "lowered.json").write_text(out.stdout.split("RESULT", 1)[1])

    return json.loads((built_once(tmp_path_factory, "lowered-steps", lower) / "lowered.json").read_text())


CASES = [(arch, dtype, layout, platform, step) for arch in ("v1", "v2") for dtype in DTYPES
         for layout in ("one", "mesh") for platform in PLATFORMS for step in ("train", "eval")]  # fmt: skip
CPU_CASES = [(arch, layout, step) for arch in ("v1", "v2") for layout in ("one", "mesh") for step in ("train", "eval")]


@pytest.mark.parametrize("arch,dtype,layout,platform,step", CASES)
def test_no_custom_call_on_other_platforms(lowered, arch, dtype, layout, platform, step):
    # The native kernels' targets are CPU-only (`flax_mobilenet_*`); no other custom call is
    # expected either: the models use XLA's operations only.
    assert lowered[arch]["lowered"][f"{dtype}/{layout}/{platform}/{step}"]["custom_calls"] == []


@pytest.mark.parametrize("arch,dtype,layout,platform,step", CASES)
def test_depthwise_layers_are_xla_convolutions(lowered, arch, dtype, layout, platform, step):
    entry = lowered[arch]
    grouped = sorted(g for g in entry["lowered"][f"{dtype}/{layout}/{platform}/{step}"]["convolutions"] if g > 1)
    # Every depthwise layer is one grouped convolution forward; training adds its input gradient
    # (a grouped convolution) and its kernel gradient (a convolution grouped over the batch,
    # feature_group_count 1), so the forward and the input gradient are counted here.
    per_layer = 2 if step == "train" else 1
    assert grouped == sorted(entry["depthwise"] * per_layer)


@pytest.mark.parametrize("arch,dtype,layout,platform,step", CASES)
def test_stem_is_an_xla_convolution(lowered, arch, dtype, layout, platform, step):
    # Not the CPU's product of the written-out patches.
    assert lowered[arch]["lowered"][f"{dtype}/{layout}/{platform}/{step}"]["stem_convolutions"] == 1


@pytest.mark.parametrize("arch", ["v1", "v2"])
@pytest.mark.parametrize("step", ["train", "eval"])
def test_cpu_float32_runs_the_native_kernels(lowered, arch, step):
    # One device: under the mesh the kernels are inside `custom_partitioning`'s calls until SPMD
    # partitioning, which this lowering does not run.
    lowered_cpu = lowered[arch]["lowered"][f"float32/one/cpu/{step}"]
    depthwise = "flax_mobilenet_depthwiseforward_f32" if step == "train" else "flax_mobilenet_depthwiseforwardaffine_f32"
    assert depthwise in lowered_cpu["custom_calls"]
    assert lowered_cpu["convolutions"] == []


@pytest.mark.parametrize("arch,layout,step", CPU_CASES)
def test_cpu_bfloat16_runs_the_shifted_form(lowered, arch, layout, step):
    # The kernels take float32 and float64 only; the CPU's bfloat16 program is the shifted
    # multiply-adds and the stem's patches: neither a convolution nor a kernel.
    lowered_cpu = lowered[arch]["lowered"][f"bfloat16/{layout}/cpu/{step}"]
    assert lowered_cpu["convolutions"] == []
    assert lowered_cpu["custom_calls"] == []


@pytest.mark.parametrize("arch", ["v1", "v2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_mesh_step_takes_the_batch_sharded(lowered, arch, dtype, platform):
    assert lowered[arch]["lowered"][f"{dtype}/mesh/{platform}/train"]["image_sharded"]


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_batch_norm_statistics_are_reduced_over_all_devices(lowered, arch):
    entry = lowered[arch]
    reduced = entry["all_reduced"]
    assert reduced and all(groups == DEVICES for _, groups in reduced)
    # Count the one-dimensional values reduced (XLA combines small all-reduces into tuples). The
    # parameters' one-dimensional gradients are BatchNorm's scale and bias (2 C per layer, the
    # backward's two sums) and the classifier's bias; the forward's batch mean and variance add
    # 2 C per layer more. Statistics kept per device would make it 2 C per layer, not 4 C.
    vectors = sum(n for n, _ in reduced)
    assert vectors >= 4 * sum(entry["norms"])
