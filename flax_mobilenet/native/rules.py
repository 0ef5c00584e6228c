"""How a kernel becomes a JAX primitive, so that every transformation goes through it:

- jit: lowered on the CPU to the kernel (split over devices by `partitioning`); elsewhere, and for
  jax.export, to its portable form (the same function in XLA's own operations);
- vmap: the mapped axis is folded into the kernel's images where the other operands are shared,
  else into its channels where the kernel treats channels independently, so one call runs the map;
- autodiff: the bilinear kernels are each other's transposes (`ad.defbilinear`, where each kernel
  is defined); a kernel that fuses eval-mode BatchNorm differentiates as its unfused form
  (`unfused_jvp`), and BatchNorm's kernels take their portable forms' tangents (`portable_jvp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax._src import dispatch
from jax.interpreters import ad, batching, mlir

from flax_mobilenet.portable import with_affine


def primitive(name: str, impl, portable, abstract_eval, batch_rule, multiple_results: bool = False):
    """The primitive `name` computed by `impl` on the CPU, by `portable` (the same function in
    XLA's own operations) elsewhere and in `jax.export`'s serialized code, which may run where these
    kernels are not built; `batch_rule(primitive)` is its vmap rule."""
    prim = Primitive(f"flax_mobilenet_{name}")
    prim.multiple_results = multiple_results
    prim.def_impl(impl)
    prim.def_abstract_eval(abstract_eval)
    native_rule = mlir.lower_fun(impl, multiple_results=multiple_results)
    portable_rule = mlir.lower_fun(portable, multiple_results=multiple_results)

    def cpu_rule(ctx, *args, **params):
        exporting = ctx.module_context.lowering_parameters.for_export
        return (portable_rule if exporting else native_rule)(ctx, *args, **params)

    mlir.register_lowering(prim, portable_rule)
    mlir.register_lowering(prim, cpu_rule, platform="cpu")
    batching.primitive_batchers[prim] = batch_rule(prim)
    # The lowering is custom_partitioning's, which needs the devices when it is lowered; jit gives
    # them only to the primitives in this set (custom_partitioning adds its own the same way). A
    # private set: where a jax lacks it, only a batch sharded over devices fails to lower.
    getattr(dispatch, "prim_requires_devices_during_lowering", set()).add(prim)
    return prim


# ----------------------------------------------------------------------------- vmap


def _mapped_size(args, dims) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _into_channels(args, dims, size):
    """Each operand with the mapped axis folded into its channels (the last axis, in every kernel)
    as channel v * C + c; an unmapped operand is repeated for each v."""
    folded = []
    for a, d in zip(args, dims):
        if d is None:
            a = jnp.broadcast_to(a[..., None, :], (*a.shape[:-1], size, a.shape[-1]))
        else:
            a = jnp.moveaxis(a, d, -2)
        folded.append(a.reshape(*a.shape[:-2], size * a.shape[-1]))
    return folded


def _out_of_channels(out, size):
    """The mapped axis back out of the channels of an output: (..., V * C) -> (..., V, C)."""
    return out.reshape(*out.shape[:-1], size, out.shape[-1] // size), out.ndim - 1


def per_channel_batch_rule(primitive):
    def rule(args, dims, **params):
        size = _mapped_size(args, dims)
        outs = primitive.bind(*_into_channels(args, dims, size), **params)
        if not primitive.multiple_results:
            return _out_of_channels(outs, size)
        unfolded = [_out_of_channels(out, size) for out in outs]
        return [out for out, _ in unfolded], [dim for _, dim in unfolded]

    return rule


def image_batch_rule(primitive, otherwise=None):
    """For a kernel whose output has its first operand's images: a map over the images alone
    (the other operands shared) folds into the batch, (V, N, ...) -> (V * N, ...); else
    `otherwise(primitive)`, by default a fold into the channels."""

    def rule(args, dims, **params):
        if any(d is not None for d in dims[1:]):
            return (otherwise or per_channel_batch_rule)(primitive)(args, dims, **params)
        a = jnp.moveaxis(args[0], dims[0], 0)
        out = primitive.bind(a.reshape(-1, *a.shape[2:]), *args[1:], **params)
        return out.reshape(a.shape[0], -1, *out.shape[1:]), 0

    return rule


def portable_batch_rule(portable):
    """vmap by the portable form's own rule (a batched dot): for maps the kernels have no use for."""
    return lambda primitive: lambda args, dims, **params: (jax.vmap(functools.partial(portable, **params), in_axes=dims)(*args), 0)


# ----------------------------------------------------------------------------- autodiff


def portable_jvp(primitive, portable):
    """The JVP rule: the kernel's value, the portable form's tangent (XLA's linear operations, which
    transpose: so reverse mode and higher derivatives work too)."""

    def rule(primals, tangents, **params):
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        _, d_out = jax.jvp(functools.partial(portable, **params), tuple(primals), tuple(tangents))
        return primitive.bind(*primals, **params), (list(d_out) if primitive.multiple_results else d_out)

    ad.primitive_jvps[primitive] = rule


def unfused_affine(linear):
    """A fused kernel's function in separate operations: activation(linear(x, w) * mul + add)."""

    def apply(x, w, mul, add, *, activation, **params):
        return with_affine(linear(x, w, **params), mul, add, activation)

    return apply


def unfused_jvp(primitive, unfused):
    """The fused `primitive`'s JVP rule: `unfused`'s JVP (value and tangent), so that every
    derivative, and the transposes, run the unfused form's kernels."""
    ad.primitive_jvps[primitive] = lambda primals, tangents, **params: jax.jvp(
        functools.partial(unfused, **params), tuple(primals), tuple(map(ad.instantiate_zeros, tangents))
    )
