"""Flax NNX modules through the same machinery as Linen ones.

``from_nnx(module)`` returns a Linen module and its variables that compute exactly what
the NNX module computes in inference mode, so every entry point (tracing, quantizing,
AdaQuant, BN and bias tuning, mixed precision, save/load, export) works on it. The
Linen module (:class:`NNXModel`) rebuilds the NNX module from its variables on every
call (``nnx.merge``, a fresh copy: nothing is mutated) and routes each of its
``nnx.Linear`` / ``nnx.Conv`` / ``nnx.ConvTranspose`` / ``nnx.LinearGeneral`` /
``nnx.Einsum`` / ``nnx.BatchNorm`` calls through the equivalent Linen layer (``nn.Dense`` /
``nn.Conv`` / ``nn.ConvTranspose`` / ``nn.DenseGeneral`` / ``nn.Einsum`` /
``nn.BatchNorm``) holding the same parameters, which the library's interceptor sees
like any Linen layer; the default attention function of each ``nnx.MultiHeadAttention``
is called through :class:`~ptq_jax.attention_sites.AttentionCore` (its matmuls can be
quantized). Layers are named by their NNX path (``layers.0``). Every other
parameter (norms, embeddings, a module's own ``nnx.Param``) stays in the
NNX code, under ``params['nnx']``, where the float-operation check still finds any
contraction of it (and names the NNX path: each such module runs in a name scope).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
from flax import nnx

from ptq_jax.attention_sites import AttentionCore

NNX_KEY = 'nnx'   # params['nnx']: the NNX parameters the converted layers do not hold


def is_nnx(model: Any) -> bool:
  return isinstance(model, nnx.Module)


def _name(path: Tuple[Any, ...]) -> str:
  return '.'.join(str(p) for p in path)


def _iter_modules(module: nnx.Module):
  fn = getattr(nnx, 'iter_modules', None)
  return fn(module) if fn is not None else module.iter_modules()


def _converted(module: nnx.Module) -> bool:
  if isinstance(module, nnx.LinearGeneral):
    return not tuple(getattr(module, 'batch_axis', {}) or {})
  return isinstance(module, (nnx.Linear, nnx.Conv, nnx.ConvTranspose, nnx.Einsum,
                             nnx.BatchNorm))


def _linen_layer(module: nnx.Module, name: str) -> nn.Module:
  """The Linen layer computing what ``module`` computes (inference mode)."""
  if isinstance(module, nnx.Linear):
    return nn.Dense(module.out_features, use_bias=module.use_bias, name=name)
  if isinstance(module, nnx.Conv):
    return nn.Conv(module.out_features, module.kernel_size, strides=module.strides,
                   padding=module.padding, input_dilation=module.input_dilation,
                   kernel_dilation=module.kernel_dilation,
                   feature_group_count=module.feature_group_count, use_bias=module.use_bias,
                   mask=module.mask, name=name)
  if isinstance(module, nnx.ConvTranspose):
    return nn.ConvTranspose(module.out_features, module.kernel_size, strides=module.strides,
                            padding=module.padding, kernel_dilation=module.kernel_dilation,
                            use_bias=module.use_bias, mask=module.mask,
                            transpose_kernel=module.transpose_kernel, name=name)
  if isinstance(module, nnx.Einsum):
    return nn.Einsum(module.kernel_shape, module.einsum_str,
                     use_bias=module.bias is not None, name=name)
  if isinstance(module, nnx.LinearGeneral):
    return nn.DenseGeneral(features=module.out_features, axis=module.axis,
                           use_bias=module.use_bias, name=name)
  return nn.BatchNorm(use_running_average=True, axis=module.axis, epsilon=module.epsilon,
                      use_bias=module.use_bias, use_scale=module.use_scale, name=name)


@functools.lru_cache(maxsize=None)
def _routed_class(cls: type) -> type:
  """A subclass of ``cls`` whose call goes to the instance's ``_ptq_call`` (the Linen
  layer). Keyword arguments left at None (``out_sharding``, say) are dropped; any other
  is an error, since the Linen layer would not apply it."""
  def call(self, x, **kwargs):
    extra = sorted(k for k, v in kwargs.items() if v is not None)
    if extra:
      raise TypeError(f'{cls.__name__} was called with {extra}, which ptq_jax cannot apply '
                      'to its quantized layer.')
    return object.__getattribute__(self, '_ptq_call')(x)
  return type(f'Routed{cls.__name__}', (cls,), {'__call__': call})


@functools.lru_cache(maxsize=None)
def _scoped_class(cls: type) -> type:
  """A subclass of ``cls`` whose call runs in a name scope of the instance's path."""
  def call(self, *args, **kwargs):
    with jax.named_scope(object.__getattribute__(self, '_ptq_name')):
      return cls.__call__(self, *args, **kwargs)
  return type(f'Scoped{cls.__name__}', (cls,), {'__call__': call})


def _get(module: Any, path: Tuple[Any, ...]) -> Any:
  for part in path:
    module = module[part] if isinstance(part, int) else getattr(module, part)
  return module


class NNXModel(nn.Module):
  """A Linen view of an NNX module (see the module docstring); built by :func:`from_nnx`."""
  graphdef: Any
  treedef: Any                             # of the NNX (Param, BatchStat) state
  leaves: Tuple[Tuple[str, str, str], ...]  # per state leaf: (collection, owner, key)
  layers: Tuple[Tuple[Tuple[Any, ...], str], ...]   # converted: (NNX path, name)
  scoped: Tuple[Tuple[Tuple[Any, ...], str, str], ...]   # others with parameters, + class
  other: Any = None                        # the rest of the NNX state (RNG streams)
  # nnx.MultiHeadAttention modules with the default attention function: (NNX path, name)
  attention: Tuple[Tuple[Tuple[Any, ...], str], ...] = ()

  @nn.compact
  def __call__(self, x):
    variables = self.variables
    values = [variables[c][o][k] for c, o, k in self.leaves]
    model = nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, values),
                      *(() if self.other is None else (self.other,)))
    model.eval()
    linen = {name: _linen_layer(_get(model, path), name) for path, name in self.layers}
    for path, name in self.layers:
      sub = _get(model, path)
      sub.__class__ = _routed_class(type(sub))
      object.__setattr__(sub, '_ptq_call', linen[name])
    for path, name, _ in self.scoped:
      sub = _get(model, path)
      sub.__class__ = _scoped_class(type(sub))
      object.__setattr__(sub, '_ptq_name', name)
    for path, name in self.attention:   # the interceptor sees them as AttentionCore calls
      core = AttentionCore(name=name)
      # (``module`` is for sowing attention weights, off in inference; Linen reserves it.)
      object.__setattr__(_get(model, path), 'attention_fn',
                         lambda *args, module=None, _core=core, **kwargs: _core(*args, **kwargs))
    return model(x)


def from_nnx(module: nnx.Module) -> Tuple[NNXModel, Dict[str, Any]]:
  """A Linen module and variables computing ``module`` in inference mode."""
  graphdef, state, *other = nnx.split(module, (nnx.Param, nnx.BatchStat), ...)
  other = other[0] if other and jax.tree.leaves(other[0]) else None
  modules = [(tuple(p), m) for p, m in _iter_modules(module) if tuple(p)]
  converted = {p: _name(p) for p, m in modules if _converted(m)}
  owners = {p: m for p, m in modules}
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  params: Dict[str, Any] = {NNX_KEY: {}}
  stats: Dict[str, Any] = {}
  leaves = []
  for key_path, leaf in flat:
    # (A Variable's payload is the attribute 'value'; module and leaf names are keys.)
    parts = tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in key_path
                  if not isinstance(k, jax.tree_util.GetAttrKey))
    owner, key = parts[:-1], str(parts[-1])
    if owner in converted and isinstance(owners[owner], nnx.BatchNorm) and key in ('mean', 'var'):
      stats.setdefault(converted[owner], {})[key] = leaf
      leaves.append(('batch_stats', converted[owner], key))
    elif owner in converted:
      params.setdefault(converted[owner], {})[key] = leaf
      leaves.append(('params', converted[owner], key))
    else:
      flat_key = _name(parts)
      params[NNX_KEY][flat_key] = leaf
      leaves.append(('params', NNX_KEY, flat_key))
  scoped = tuple((p, _name(p), type(m).__name__) for p, m in modules
                 if p not in converted and callable(m)
                 and any(isinstance(v, nnx.Param) for v in vars(m).values()))
  attention = tuple((p, _name(p)) for p, m in modules if isinstance(m, nnx.MultiHeadAttention)
                    and m.attention_fn is nnx.dot_product_attention)
  model = NNXModel(graphdef, treedef, tuple(leaves), tuple(converted.items()), scoped, other,
                   attention)
  variables = {'params': params}
  if stats:
    variables['batch_stats'] = stats
  return model, variables


def as_linen(model: Any, variables: Any, calib: Any = False) -> Tuple[nn.Module, Any]:
  """``(model, variables)`` for the library: an NNX module converted (it carries its own
  state: ``variables`` must be None), a Linen module with its variables checked
  present. ``calib`` (if passed) must not be None."""
  if calib is None:
    raise TypeError('calib (the calibration images) is required: quantize(model, variables, '
                    'calib) for a Linen module, quantize(module, calib=images) for NNX.')
  if is_nnx(model):
    if variables is not None:
      raise TypeError('An NNX module carries its own state: call it without variables, e.g. '
                      'ptq_jax.quantize(module, calib=images).')
    return from_nnx(model)
  if not isinstance(model, nn.Module):
    raise TypeError(f'model must be a flax.linen.Module or a flax.nnx.Module, got '
                    f'{type(model).__name__}.')
  if variables is None:
    raise TypeError('A Linen module needs its variables: ptq_jax.quantize(model, variables, '
                    'calib).')
  return model, variables


def to_nnx(model: NNXModel, variables: Dict[str, Any]) -> nnx.Module:
  """The NNX module an :class:`NNXModel` computes, holding ``variables`` (a trained or
  loaded checkpoint of a registry NNX model, say), in inference mode."""
  if not isinstance(model, NNXModel):
    raise TypeError(f'to_nnx takes the Linen view of an NNX module (an NNXModel), got '
                    f'{type(model).__name__}.')
  values = [variables[c][o][k] for c, o, k in model.leaves]
  module = nnx.merge(model.graphdef, jax.tree.unflatten(model.treedef, values),
                     *(() if model.other is None else (model.other,)))
  module.eval()
  return module
