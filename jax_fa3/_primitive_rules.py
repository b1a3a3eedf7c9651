"""How jax_fa3's primitives are made: lowered to the CUDA kernels on CUDA and to JAX
elsewhere, and batched by folding a vmapped axis into the batch."""

import functools

from jax.extend.core import Primitive
from jax.interpreters import batching, mlir, xla


def define_primitive(name, abstract_eval, reference_rule, cuda_rule, batcher=None):
  """A multiple-result primitive lowered to `cuda_rule` on CUDA and to `reference_rule`
  elsewhere; vmap folds the mapped axis into the batch unless `batcher(primitive)` gives
  another rule."""
  primitive = Primitive(name)
  primitive.multiple_results = True
  primitive.def_impl(functools.partial(xla.apply_primitive, primitive))
  primitive.def_abstract_eval(abstract_eval)
  mlir.register_lowering(primitive, mlir.lower_fun(reference_rule, multiple_results=True))
  mlir.register_lowering(
    primitive, mlir.lower_fun(cuda_rule, multiple_results=True), platform="cuda"
  )
  batching.primitive_batchers[primitive] = (batcher or fold_vmap_axis_into_batch_rule)(primitive)
  return primitive


def fold_vmap_axis_into_batch_rule(primitive):
  return functools.partial(fold_vmap_axis_into_batch, primitive)


def fold_vmap_axis_into_batch(primitive, args, dims, **params):
  """Every operand and result of both primitives leads with the batch axis (or is an
  absent operand, shape [0]), so a vmapped axis, moved to the front, merges into it."""
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  args = [batching.bdim_at_front(x, d, size) for x, d in zip(args, dims)]
  outs = primitive.bind(*[x.reshape(-1, *x.shape[2:]) for x in args], **params)
  return [o.reshape(size, -1, *o.shape[1:]) for o in outs], [0] * len(outs)
