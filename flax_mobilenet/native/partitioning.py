"""The kernels under `jax.jit` with the batch sharded over devices (train.distributed).

XLA would gather a custom call's operands onto every device. `custom_partitioning` says how the
kernels split instead: each device runs them on its own images, and the operands without a batch
(kernels, per-channel terms) are whole on each device. A kernel whose output keeps the batch is
then done; one that sums over the batch (a kernel gradient, BatchNorm's sums) gives each device a
partial result, which is combined over the batch's mesh axes.
"""

from __future__ import annotations

import functools

import jax


def _batch_axes(sharding) -> str | tuple | None:
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _per_image(sharding, mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(_batch_axes(sharding)))


def _replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def psum(partial, axes):
    """Each device's partial sums, summed over the devices."""
    return jax.tree.map(lambda part: jax.lax.psum(part, axes), partial)


def per_image(run, sharding_rule: str, static: int = 0, combine=None, reduction_factors: str = "", need_replication_factors: str = ""):
    """`run(*arrays, *static_args)` split over the images of its first operand.

    `sharding_rule` is Shardy's (einsum-like, e.g. "n h w c, i j c -> n o q c"); the operands whose
    first factor is the first operand's (the batch) are split, the others whole on each device.
    Without `combine` every output keeps the batch, split as the first operand is; with it, the
    outputs have no batch and `combine(partials, axes)` (e.g. `psum`) joins the devices' results
    over the batch's mesh axes, whole on every device. The factor lists are the rule's
    `reduction_factors` and `need_replication_factors`, space-separated.

    The `custom_partitioning` function is made on first call, so that importing never depends on
    that API's version.
    """
    inputs, outputs = (side.split(",") for side in sharding_rule.split("->"))
    batch = inputs[0].split()[0]
    split = tuple(spec.split()[:1] == [batch] for spec in inputs)
    operands = len(inputs)

    def shardings(arg_shapes, mesh):
        images = _per_image(arg_shapes[0].sharding, mesh)
        each = images if combine is None else _replicated(mesh)
        return (each if len(outputs) == 1 else (each,) * len(outputs)), tuple(images if s else _replicated(mesh) for s in split)

    def partition(*args):
        static_args, (mesh, arg_shapes, result_shape) = args[:-3], args[-3:]
        axes = _batch_axes(arg_shapes[0].sharding)
        results, arguments = shardings(arg_shapes, mesh)

        def lower(*arrays):
            out = run(*arrays, *static_args)
            return out if combine is None or axes is None else combine(out, axes)

        return mesh, lower, results, arguments

    def infer(*args):
        mesh, arg_shapes = args[-3:-1]
        return shardings(arg_shapes, mesh)[0]

    @functools.cache
    def made():
        from jax.experimental.custom_partitioning import custom_partitioning

        fn = custom_partitioning(run, static_argnums=tuple(range(operands, operands + static)))
        fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule,
                         reduction_factors=tuple(reduction_factors.split()),
                         need_replication_factors=tuple(need_replication_factors.split()))  # fmt: skip
        return fn

    return lambda *args: made()(*args)
