"""The Flax models compute what the PyTorch models compute: logits in eval and training mode, the
updated BatchNorm statistics, and the gradients of the cross-entropy loss.

Every PyTorch model has random weights, random BatchNorm statistics and affine parameters
(`parity.random_weights.randomize_batchnorm`) and a random classifier bias, so that a converter or layer
that ignored any of them would fail. Float32 on the CPU, batch 2 unless said otherwise.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import optax
import pytest
import torch

from flax_mobilenet import create_model
from parity.models import flax_logits, flax_model, relative_l2, to_nchw, torch_logits
from parity.random_weights import random_batch, random_torch_model
from parity.weights import num_classes_of, rules, torch_to_flax

V1_WIDTHS = (0.25, 0.5, 0.75, 1.0)
V2_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)
CONFIGS = [("v1", w) for w in V1_WIDTHS] + [("v2", w) for w in V2_WIDTHS]
# 97 and 161 are odd, so every stride-2 layer sees an odd input and a padding that differs from
# PyTorch's symmetric one (e.g. 'SAME') changes the output: every width is tested there. At the
# papers' 224, where nothing new can go wrong, the smallest width, 1.0 and the largest of each
# model are (each configuration costs a JIT compilation of ~3 s, and the suite has a time budget).
ODD_RESOLUTIONS = (97, 161)
CONFIGS_224 = [("v1", 0.25), ("v1", 1.0), ("v2", 0.35), ("v2", 1.0), ("v2", 1.4)]
# The bound. What remains is float32 rounding in a different summation order: measured
# about 5e-6 at worst (see the "measured parity errors" summary printed at the end of the run).
LOGITS_RTOL = 1e-5


def run_both(torch_model: torch.nn.Module, arch: str, width_mult: float, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits of `torch_model` and of the Flax model holding its converted weights."""
    state_dict = torch_model.state_dict()
    variables = torch_to_flax(state_dict, arch, width_mult)
    model = flax_model(arch, width_mult, num_classes_of(state_dict, arch))
    return torch_logits(torch_model.eval(), x_nhwc), flax_logits(model, variables, x_nhwc)


@pytest.mark.parametrize(
    "arch, width, resolution",
    [(arch, width, r) for r in ODD_RESOLUTIONS for arch, width in CONFIGS] + [(a, w, 224) for a, w in CONFIGS_224],
)
def test_eval_logits_match_torch_ref(arch, width, resolution, record_property):
    torch_model = random_torch_model(arch, width, seed=1)
    expected, got = run_both(torch_model, arch, width, random_batch(2, resolution, seed=2))
    error = relative_l2(got, expected)
    record_property("logits_rel_l2", error)
    assert error <= LOGITS_RTOL


# Against torchvision itself at the sizes compiled above (the Flax side reuses those compilations).
@pytest.mark.parametrize(
    "width, resolution", [(w, r) for r in ODD_RESOLUTIONS for w in V2_WIDTHS] + [(w, 224) for a, w in CONFIGS_224 if a == "v2"]
)
def test_eval_logits_match_torchvision_mobilenet_v2(width, resolution, record_property):
    torch_model = random_torch_model("v2", width, seed=3, reference="torchvision")
    expected, got = run_both(torch_model, "v2", width, random_batch(2, resolution, seed=4))
    error = relative_l2(got, expected)
    record_property("logits_rel_l2", error)
    assert error <= LOGITS_RTOL


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_randomised_reference_output_depends_on_the_input(arch):
    # Guards the tests above against having no teeth: with BN statistics drawn independently of
    # the network, the logits of a random MobileNet were measured equal across a batch to 1e-8,
    # and a padding bug would not change them.
    logits = random_torch_model(arch, 0.5, seed=1)(to_nchw(random_batch(2, 97, seed=2))).detach().numpy()
    # Samples' logits differ by over 1% of their size (measured about 10%).
    assert relative_l2(logits[0], logits[1]) > 1e-2


# Training mode: one forward and backward pass in both frameworks, shared by the tests below.
# Dropout is built with rate 0 in both models: the two frameworks draw different masks, so only
# the deterministic part can be compared (dropout itself is `nn.Dropout` on each side).
# Batch 8 at 65x65 (3x3 in the last stage): BatchNorm normalises with the batch's own statistics,
# which needs a few values per channel.
TRAIN_BATCH, TRAIN_RESOLUTION = 8, 65


def _torch_train_step(model: torch.nn.Module, x: np.ndarray, labels: np.ndarray, arch: str) -> dict:
    """Logits, updated BN statistics and parameter gradients of one step, in Flax's layout."""
    dtype = next(model.parameters()).dtype
    logits = model.train()(to_nchw(x).to(dtype))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    # The converter's own rules (transpose, rename) put the gradients where Flax has them.
    after = torch_to_flax({**model.state_dict(), **grads}, arch, 1.0)
    return {"logits": logits.detach().numpy(), "stats": after["batch_stats"], "grads": after["params"]}


@pytest.fixture(scope="module", params=["v1", "v2"])
def train_step(request):
    arch = request.param
    torch_model = random_torch_model(arch, 1.0, seed=5, dropout=0.0)
    # The same model in float64: the exact answer both float32 implementations are judged by.
    exact_model = copy.deepcopy(torch_model).double()
    variables = torch_to_flax(torch_model.state_dict(), arch, 1.0)
    x = random_batch(TRAIN_BATCH, TRAIN_RESOLUTION, seed=6)
    labels = np.arange(TRAIN_BATCH) * 7 % 1000

    model = flax_model(arch, 1.0, dropout=0.0)

    def loss(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), (out, updates)

    (_, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return {
        "torch": _torch_train_step(torch_model, x, labels, arch),
        "exact": _torch_train_step(exact_model, x, labels, arch),
        "flax": {"logits": np.asarray(logits), "stats": updates["batch_stats"], "grads": grads},
    }


def _pairs(*trees):
    """(path, leaf of each tree) for trees of the same structure."""
    flat = [dict(jax.tree_util.tree_flatten_with_path(tree)[0]) for tree in trees]
    assert all(f.keys() == flat[0].keys() for f in flat)
    return [(jax.tree_util.keystr(path), *(np.asarray(f[path], np.float64) for f in flat)) for path in flat[0]]


def test_train_mode_logits_match(train_step, record_property):
    flax, torch_, exact = (train_step[k]["logits"] for k in ("flax", "torch", "exact"))
    record_property("logits_rel_l2", relative_l2(flax, torch_))
    record_property("logits_rel_l2_flax_vs_float64", relative_l2(flax, exact))
    record_property("logits_rel_l2_torch_vs_float64", relative_l2(torch_, exact))
    # Dividing by the batch's standard deviation amplifies rounding: PyTorch's own float32 logits
    # are ~8e-6 from the float64 ones here (measured), so the eval bound of 1e-5 between the two
    # frameworks would have no margin. Flax must be as close to float64 as PyTorch is, within 2x
    # (the two sum in different orders) plus 1e-6.
    assert relative_l2(flax, exact) <= 2 * relative_l2(torch_, exact) + 1e-6


def test_train_mode_updates_running_statistics_as_pytorch(train_step, record_property):
    # New running mean and (unbiased) variance after one step with momentum 0.1, every BN layer.
    errors = {path: relative_l2(flax, torch_) for path, torch_, flax in _pairs(train_step["torch"]["stats"], train_step["flax"]["stats"])}
    worst = max(errors, key=errors.get)
    record_property("running_stats_rel_l2", errors[worst])
    # Each statistic is 0.9 * old + 0.1 * a batch mean or variance, in float32: rounding only
    # (measured up to 5e-7); a biased variance would be off by 1/(n-1) >= 1/577 = 1.7e-3.
    assert errors[worst] <= 1e-5, worst


def test_cross_entropy_gradients_match_for_every_parameter(train_step, record_property):
    pairs = _pairs(train_step["exact"]["grads"], train_step["torch"]["grads"], train_step["flax"]["grads"])
    total = np.sqrt(sum(np.sum(np.square(exact)) for _, exact, _, _ in pairs))
    # Why no tight bound: the backward pass of a training-mode BatchNorm subtracts nearly equal
    # sums, and ~50 of them in a row amplify float32 rounding by an amount that depends on the
    # weights and on the order of every sum. Against the float64 gradient, PyTorch's own float32
    # gradient was measured from 6e-5 to 3e-2 off (relative, per tensor), depending on the seed;
    # Flax's (XLA sums in another order) from 4e-4 to 4e-2, and over the whole gradient up to
    # 1.4e-2 where PyTorch's was 1.2e-2 (V2). That the two compute the same function is pinned in
    # float64 by test_gradients_equal_pytorch_in_float64. Here: (1) over the whole gradient, each
    # framework is within 5e-2 of float64; (2) no tensor's difference between the frameworks
    # exceeds 1e-2 of the whole gradient's norm (measured up to ~5e-3; a wrong layout or formula
    # is of order 1e-1).
    worst = 0.0
    for path, exact, torch_, flax in pairs:
        difference = np.linalg.norm(flax - torch_)
        worst = max(worst, difference / total)
        assert difference <= 1e-2 * total, (path, difference, total)
    flax_error = np.sqrt(sum(np.sum(np.square(flax - exact)) for _, exact, _, flax in pairs)) / total
    torch_error = np.sqrt(sum(np.sum(np.square(torch_ - exact)) for _, exact, torch_, _ in pairs)) / total
    record_property("grad_max_tensor_diff_over_total_norm", float(worst))
    record_property("grad_rel_l2_flax_vs_float64", float(flax_error))
    record_property("grad_rel_l2_torch_vs_float64", float(torch_error))
    assert flax_error <= 5e-2
    assert torch_error <= 5e-2


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_gradients_equal_pytorch_in_float64(arch, record_property):
    """In float64 rounding no longer hides anything: the gradient of every parameter, through
    training-mode BatchNorm, is the same function in both frameworks."""
    width, resolution, batch = 0.5, 64, 8
    torch_model = random_torch_model(arch, width, dropout=0.0, seed=7).double().train()
    images = random_batch(batch, resolution, seed=8).astype(np.float64)
    labels = np.arange(batch) * 7 % 1000
    torch.nn.functional.cross_entropy(torch_model(to_nchw(images)), torch.from_numpy(labels)).backward()
    torch_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: np.asarray(a, np.float64), torch_to_flax(torch_model.state_dict(), arch, width))
        model = create_model(arch, width, dropout=0.0, dtype=jax.numpy.float64)

        def loss(params):
            logits, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        flax_grads = jax.tree.map(np.asarray, jax.grad(loss)(variables["params"]))
    total = np.sqrt(sum(np.sum(np.square(g)) for g in torch_grads.values()))
    worst = 0.0
    for rule in rules(create_model(arch, width).architecture):
        if rule.flax_path[0] != "params":
            continue
        node = flax_grads
        for name in rule.flax_path[1:]:
            node = node[name]
        # Against the whole gradient's norm, not the tensor's own: in V2 the bias of every linear
        # projection's BatchNorm reaches the loss only through 1x1 convolutions followed by
        # training-mode BatchNorm, which removes any per-channel constant, so its gradient is
        # mathematically zero and both frameworks return rounding noise (~1e-17) for it.
        worst = max(worst, np.linalg.norm(rule.from_flax(node) - torch_grads[rule.key]) / total)
    record_property("grad_diff_over_total_norm_float64", float(worst))
    # float64 rounding through ~50 layers: measured ~1e-14; any difference in the formulas (a
    # biased variance, a missing term, a wrong layout) is of the order of the tensor's gradient.
    assert worst <= 1e-10
