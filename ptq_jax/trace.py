"""The layer table of a Flax model, from one traced forward pass.

``flax.linen.intercept_methods`` sees every ``nn.Conv`` / ``nn.Dense`` /
``nn.BatchNorm`` call with its module path, input and output; ``jax.make_jaxpr``
makes the trace abstract (no computation) and gives the dataflow graph, in which
each operation carries the module path in its name stack. From it we read which
BatchNorm consumes a layer's output directly (to fold) and whether the (folded)
output feeds a ReLU / ReLU6 directly (AdaQuant's loss needs this). The activation
is recognised by what it computes on probe values, not by any name. Counts are
per example.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from ptq_jax.calling import inference_kwargs
from ptq_jax.float_ops import FloatOp, find_float_ops, nested_layers, relative_stack
from ptq_jax.linear import LayerGeometry, dense_general_view, einsum_view, geometry_of
from ptq_jax.nnx_bridge import NNXModel
from ptq_jax.param_views import ParamView, find_views
from ptq_jax.attention_sites import AttentionCore, attention_fn_swapped, is_linen_site
from ptq_jax.matmul_sites import MatmulSite, find_sites, loop_sites


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One weight layer as seen in the traced forward pass."""

  path: str                        # module path, e.g. 'BasicBlock_0/Conv_1'
  kind: str                        # 'conv', 'dense' or 'einsum'
  kernel_shape: Tuple[int, ...]
  groups: int                      # feature_group_count (1 for dense)
  input_shape: Tuple[int, ...]     # per example, no batch dim
  output_shape: Tuple[int, ...]
  params: int                      # kernel + bias elements
  macs: int                        # multiply-accumulates per example
  # Strides, explicit padding, dilations, groups; None where lax has no plain equivalent.
  geometry: Optional[LayerGeometry] = None
  bn_path: Optional[str] = None    # the BatchNorm consuming the output directly, if any
  bn_epsilon: Optional[float] = None
  activation: str = 'none'         # 'relu' / 'relu6' if the (BN-)output feeds one directly
  sites: int = 1                   # calls per forward pass (> 1: shared weights)
  # A layer applied with explicitly passed parameters (a tied head): how its kernel is
  # made from another parameter (ptq_jax.param_views); None for a layer's own kernel.
  kernel_view: Optional[ParamView] = None
  bias_view: Optional[ParamView] = None


def _conv_info(module: nn.Conv, path: str, x, y, variables) -> LayerInfo:
  kernel = variables['kernel']
  groups = int(module.feature_group_count)
  # Each output element sums over the kernel's spatial window and in_channels/groups.
  macs = int(np.prod(y.shape[1:])) * int(np.prod(kernel.shape[:-1]))
  params = sum(int(np.size(v)) for v in variables.values())
  return LayerInfo(path, 'conv', tuple(kernel.shape), groups, tuple(x.shape[1:]),
                   tuple(y.shape[1:]), params, macs, geometry_of(module, x.shape, kernel.shape))


def _dense_info(module: nn.Dense, path: str, x, y, variables) -> LayerInfo:
  kernel = variables['kernel']
  rows = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
  macs = rows * int(np.prod(kernel.shape))
  params = sum(int(np.size(v)) for v in variables.values())
  return LayerInfo(path, 'dense', tuple(kernel.shape), 1, tuple(x.shape[1:]),
                   tuple(y.shape[1:]), params, macs, geometry_of(module, x.shape, kernel.shape))


def _dense_general_info(module: nn.DenseGeneral, path: str, x, y, variables
                       ) -> Optional[LayerInfo]:
  """A DenseGeneral that is a Dense on reshaped views (``dense_general_view``) as a
  dense layer with a (in, out) kernel; None for any other (it is then a float op)."""
  view = dense_general_view(module, x.ndim)
  if view is None:
    return None
  n_in, features = view
  fan_in, fan_out = int(np.prod(x.shape[x.ndim - n_in:])), int(np.prod(features))
  rows = int(np.prod(x.shape[1:x.ndim - n_in]))
  params = sum(int(np.size(v)) for v in variables.values())
  return LayerInfo(path, 'dense', (fan_in, fan_out), 1,
                   tuple(x.shape[1:x.ndim - n_in]) + (fan_in,),
                   tuple(y.shape[1:y.ndim - len(features)]) + (fan_out,), params,
                   rows * fan_in * fan_out, LayerGeometry('dense'))


def _conv_transpose_info(module: nn.ConvTranspose, path: str, x, y, variables
                        ) -> Optional[LayerInfo]:
  """A transposed conv with a plain geometry as a conv layer (None otherwise)."""
  kernel = variables['kernel']
  geom = geometry_of(module, x.shape, kernel.shape)
  if geom is None:
    return None
  # Every input pixel meets every kernel weight once.
  macs = int(np.prod(x.shape[1:-1])) * int(np.prod(kernel.shape))
  params = sum(int(np.size(v)) for v in variables.values())
  return LayerInfo(path, 'conv', tuple(kernel.shape), 1, tuple(x.shape[1:]), tuple(y.shape[1:]),
                   params, macs, geom)


def _einsum_info(module: nn.Einsum, path: str, x, y, variables) -> Optional[LayerInfo]:
  """An ``nn.Einsum`` of a supported form (``einsum_view``) as a layer, its output
  features flattened into one axis."""
  kernel = variables['kernel']
  view = einsum_view(module, x.ndim)
  if view is None:
    return None
  n, fan_out = len(view[1]), int(np.prod(view[1]))
  macs = int(np.prod(y.shape[1:])) * int(np.prod(kernel.shape[:-n]))
  params = sum(int(np.size(v)) for v in variables.values())
  return LayerInfo(path, 'einsum', tuple(kernel.shape[:-n]) + (fan_out,), 1,
                   tuple(x.shape[1:]), tuple(y.shape[1:-n]) + (fan_out,), params, macs,
                   LayerGeometry('einsum', equation=view[0]))


_HANDLERS = ((nn.Conv, _conv_info), (nn.Dense, _dense_info),
             (nn.DenseGeneral, _dense_general_info), (nn.ConvTranspose, _conv_transpose_info),
             (nn.Einsum, _einsum_info))
LAYER_TYPES = tuple(cls for cls, _ in _HANDLERS)   # (what the interceptor swaps)


_PROBE = np.array([-7.0, -3.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0, 5.5, 6.0, 6.5, 9.0],
                  np.float32)
_ACTIVATIONS = (('relu', lambda x: np.maximum(x, 0.0)),
                ('relu6', lambda x: np.clip(x, 0.0, 6.0)))


def activation_fn(name: str):
  """The activation a layer's ``activation`` field names, as a function."""
  return {'relu': jax.nn.relu, 'relu6': lambda y: jnp.clip(y, 0.0, 6.0),
          'none': lambda y: y}[name]


def _classify_activation(eqn) -> str:
  """'relu' / 'relu6' if the one-input elementwise ``eqn`` computes it, else 'none'."""
  variables = [v for v in eqn.invars if not isinstance(v, jex.Literal)]
  if len(variables) != 1 or len(eqn.outvars) != 1:
    return 'none'
  aval = variables[0].aval
  if eqn.outvars[0].aval.shape != aval.shape or not jnp.issubdtype(aval.dtype, jnp.floating):
    return 'none'
  probe = np.resize(_PROBE, aval.shape).astype(aval.dtype)
  args = [probe if not isinstance(v, jex.Literal) else v.val for v in eqn.invars]
  try:
    inner = eqn.params.get('call_jaxpr', eqn.params.get('jaxpr'))  # custom_jvp / pjit
    if isinstance(inner, jex.ClosedJaxpr):
      (out,) = jex.jaxpr_as_fun(inner)(*args)
    else:
      out = eqn.primitive.bind(*args, **eqn.params)
  except Exception:  # Not evaluable in isolation: not a plain activation.
    return 'none'
  out = np.asarray(out)
  for name, fn in _ACTIVATIONS:
    if np.array_equal(out, fn(probe)):
      return name
  return 'none'


def _graph_facts(jaxpr, root: str, layers: List[LayerInfo],
                 bn_of: Dict[str, str]) -> List[LayerInfo]:
  """Fills ``bn_path`` and ``activation`` from the dataflow graph.

  Operations inside module ``path`` carry the name stack ``root/path``.
  """
  eqns = jaxpr.eqns
  consumers: Dict[Any, List[int]] = {}
  for i, eqn in enumerate(eqns):
    for v in eqn.invars:
      if not isinstance(v, jex.Literal):
        consumers.setdefault(v, []).append(i)

  def stack_of(eqn) -> str:
    return relative_stack(str(eqn.source_info.name_stack), root)

  def output_var(path: str):
    """The output of the last operation run directly inside module ``path``."""
    for eqn in reversed(eqns):
      if stack_of(eqn) == path:
        return eqn.outvars[0]
    return None

  def in_module(i: int, path: str) -> bool:
    name = stack_of(eqns[i])
    return name == path or name.startswith(path + '/')

  result = []
  for layer in layers:
    out = output_var(layer.path)
    bn_path = bn_of.get(layer.path)
    if bn_path is not None and out is not None:
      # Fold only if the BatchNorm is the sole consumer of the layer's output.
      if not all(in_module(i, bn_path) for i in consumers.get(out, [])):
        bn_path = None
    if bn_path is not None:
      out = output_var(bn_path)
    activation = 'none'
    uses = consumers.get(out, []) if out is not None else []
    if len(uses) == 1:
      activation = _classify_activation(eqns[uses[0]])
    result.append(dataclasses.replace(layer, bn_path=bn_path, activation=activation))
  return result


@dataclasses.dataclass(frozen=True)
class AttentionSite:
  """An attention module whose two matmuls ``quantize_matmuls`` can quantize
  (:mod:`ptq_jax.quant.attention`)."""
  path: str
  q_shape: Tuple[int, ...]     # per example: (length, heads, depth)
  k_shape: Tuple[int, ...]
  v_shape: Tuple[int, ...]
  masked: bool                 # called with a mask, a bias or is_causal
  macs: int                    # of Q·Kᵀ and attention·V, per example


@dataclasses.dataclass(frozen=True)
class Traced:
  """What one traced forward pass tells: the quantizable layers, every other
  parameter-carrying linear operation (which would stay float; see
  :mod:`ptq_jax.float_ops`), the attention sites and the activation x activation
  matmuls outside them."""
  layers: List[LayerInfo]
  float_ops: List[FloatOp]
  attention: List[AttentionSite] = dataclasses.field(default_factory=list)
  # Activation x activation matmuls quantize_matmuls cannot quantize (inside a loop or
  # branch, or in an attention module called more than once).
  other_matmuls: List[FloatOp] = dataclasses.field(default_factory=list)
  # Those it can: the matmul sites (ptq_jax.quant.matmul_sites).
  matmul_sites: List[MatmulSite] = dataclasses.field(default_factory=list)


def _site(path: str, args, kwargs) -> AttentionSite:
  query, key, value = (np.shape(a) for a in args[:3])
  masked = (any(a is not None for a in args[3:5])
            or any(kwargs.get(k) is not None for k in ('bias', 'mask'))
            or bool(kwargs.get('is_causal', False)))
  heads, length_q, length_k = query[-2], query[-3], key[-3]
  batch = int(np.prod(query[1:-3]))
  macs = batch * heads * length_q * length_k * (query[-1] + value[-1])
  return AttentionSite(path, tuple(query[1:]), tuple(key[1:]), tuple(value[1:]), masked, macs)


def trace(model: nn.Module, variables: Dict[str, Any], x: Any,
          **apply_kwargs) -> List[LayerInfo]:
  """Layer table of ``model`` at input ``x`` (a batch; only its shape and dtype matter),
  in call order; :func:`trace_model` also lists what cannot be quantized."""
  return trace_model(model, variables, x, **apply_kwargs).layers


def trace_model(model: nn.Module, variables: Dict[str, Any], x: Any,
                **apply_kwargs) -> Traced:
  """The layer table and the float operations of ``model`` at input ``x``.

  A layer called more than once (shared weights) is one layer with ``sites`` > 1 if every
  call has the same input shape, and a float operation otherwise. A BatchNorm is folded
  only when it normalises the last (output-feature) axis of the layer output it directly
  consumes (never into a shared layer: its sites may have different BatchNorms).
  """
  seen = _Calls()

  def forward(variables, x):
    with nn.intercept_methods(seen.intercept):
      return model.apply(variables, x, **{**inference_kwargs(model), **apply_kwargs})

  closed = jax.make_jaxpr(forward)(variables, x)
  root = model.name or type(model).__name__
  if isinstance(model, NNXModel):   # NNX modules left in NNX code run in name scopes
    seen.modules.update({name: cls for _, name, cls in model.scoped})
  # A layer called at several sites with one input shape is one shared layer: one
  # kernel and weight quantizer, an input quantizer per site, no BatchNorm folded, its
  # loss before any activation. With different shapes at its sites it is not quantized.
  calls, layers = seen.calls, seen.layers
  shared = {p for p, n in calls.items() if n > 1}
  mismatched = {p for p in shared if len(seen.shapes[p]) > 1}
  single = _graph_facts(closed.jaxpr, root, [l for l in layers if l.path not in shared],
                        {p: b for p, b in seen.bn_of.items() if p not in shared})
  single = {l.path: dataclasses.replace(l, bn_epsilon=seen.bn_eps[l.bn_path]) if l.bn_path
            else l for l in single}
  nested = nested_layers(closed, root, [l.path for l in layers])
  kept = [single[l.path] if l.path not in shared
          else dataclasses.replace(l, sites=calls[l.path], macs=l.macs * calls[l.path])
          for l in layers if l.path not in mismatched and l.path not in nested]
  views = (explicit_views(model, variables, x, seen.explicit, **apply_kwargs)
           if seen.explicit else {})
  kept, untied = _with_views(kept, views, seen.modules)
  leaves = jax.tree_util.tree_flatten_with_path((variables, x))[0]
  is_param = [len(k) > 1 and getattr(k[0], 'idx', None) == 0
              and getattr(k[1], 'key', None) == 'params' for k, _ in leaves]
  is_data = [getattr(k[0], 'idx', None) == 1 for k, _ in leaves]
  float_ops = (_unquantized_calls(seen, mismatched, nested) + untied
               + find_float_ops(closed, is_param, is_data, root, calls, seen.modules))
  attention = [s for p, s in seen.sites.items() if seen.site_calls[p] == 1]
  seen.modules.update({p: 'attention' for p in seen.sites if p not in seen.modules})
  sites = find_sites(closed, is_data, root, list(calls) + list(seen.sites), seen.modules)
  other = [FloatOp(p, seen.modules.get(p, ''), 'attention module call', 0,
                   f'an attention module called {n} times (quantize_matmuls quantizes the '
                   'matmuls of an attention module called once)')
           for p, n in seen.site_calls.items() if n > 1]
  other += [FloatOp(s.name, seen.modules.get(s.path, ''), 'dot_general', 0,
                    f'an activation x activation matmul inside a {s.inside} body, which '
                    'ptq_jax cannot quantize in place (move the matmul out of the loop, e.g. '
                    'unroll the nn.scan)') for s in loop_sites(sites)]
  return Traced(kept, float_ops, attention, other, [s for s in sites if not s.inside])


def _unquantized_calls(seen: '_Calls', mismatched: set, nested: Dict[str, str]
                       ) -> List[FloatOp]:
  """The traced layers that are not quantized: a shared layer called with different
  input shapes, a layer inside a loop body or rematerialised function."""
  ops = [FloatOp(l.path, seen.modules.get(l.path, ''), 'module call', l.params,
                 f'called {seen.calls[l.path]} times with different input shapes (shared '
                 'weights are quantized when every call has the same input shape)')
         for l in seen.layers if l.path in mismatched]
  return ops + [FloatOp(l.path, seen.modules.get(l.path, ''), 'module call', l.params,
                        f'runs inside a {nested[l.path]} program (nn.scan, nn.remat or a '
                        'loop), where ptq_jax cannot capture a layer\'s inputs; quantize the '
                        'model written without that transform (the same parameters)')
                for l in seen.layers if l.path in nested and l.path not in mismatched]


def _with_views(layers: List[LayerInfo], views: Dict[str, Any], modules: Dict[str, str]
                ) -> Tuple[List[LayerInfo], List[FloatOp]]:
  """The layers applied with explicitly passed parameters, given their kernel's (and
  bias's) :class:`ParamView`; float operations instead where a passed parameter is no
  view of one parameter, or its parameter is already another layer's kernel."""
  owned = {f'{l.path}/kernel' for l in layers if f'{l.path}/kernel' not in views}
  kept, refused = [], []
  for layer in layers:
    kernel, bias = views.get(f'{layer.path}/kernel'), views.get(f'{layer.path}/bias')
    if kernel is None:   # (its own kernel)
      kept.append(layer)
      continue
    why = next((f'its {name} {v}' for name, v in (('kernel', kernel), ('bias', bias))
                if isinstance(v, str)), None)
    if why is None and kernel.name in owned:
      why = (f'its kernel is {kernel.name}, which another layer quantizes with its own '
             'weight quantizer')
    if why is None:
      owned.add(kernel.name)
      kept.append(dataclasses.replace(layer, kernel_view=kernel, bias_view=bias))
    else:
      refused.append(FloatOp(
          layer.path, modules.get(layer.path, ''), 'module call', layer.params,
          f'{layer.path} is applied with explicitly passed parameters and {why}; ptq_jax '
          'quantizes such a layer (a tied head) when its kernel is a transpose or reshape '
          'of one parameter that no other layer uses as its kernel'))
  return kept, refused


class CallPaths:
  """The path at which each intercepted module call runs (an interceptor enters and
  exits it around every call): the module's own path, or for a module applied with
  explicitly passed parameters (``self.head.apply({'params': ...}, x)``, whose own path
  is empty) the caller's path joined with its name, its submodules below that."""

  def __init__(self):
    self.stack: List[str] = []
    self.roots: Dict[int, str] = {}   # id(root scope of an explicit apply) -> its path

  def enter(self, module: nn.Module) -> Tuple[str, bool]:
    """``(path, explicit)`` of this call: explicit if applied with passed parameters."""
    if not self.stack:
      self.roots = {}   # the outermost call: the model itself
    root = id(module.scope.root) if module.scope is not None else 0
    if not module.path and module.name is not None and root not in self.roots:
      parent = self.stack[-1] if self.stack else ''   # (applied inside its caller)
      self.roots[root] = f'{parent}/{module.name}' if parent else module.name
    prefix = self.roots.get(root, '')
    path = '/'.join(p for p in (prefix, *module.path) if p)
    self.stack.append(path)
    return path, bool(prefix)

  def exit(self) -> None:
    self.stack.pop()

  def interceptor(self, body):
    """An ``nn.intercept_methods`` interceptor running ``body(next_fun, args, kwargs,
    context, path, explicit)`` with the call entered (:meth:`enter`) and left around it."""
    def intercept(next_fun, args, kwargs, context):
      path, explicit = self.enter(context.module)
      try:
        return body(next_fun, args, kwargs, context, path, explicit)
      finally:
        self.exit()
    return intercept


def explicit_views(model: nn.Module, variables: Mapping[str, Any], x: Any,
                   paths: Sequence[str], **apply_kwargs) -> Dict[str, Any]:
  """``'path/kernel'`` (and ``'path/bias'``) -> the :class:`ParamView` making that
  explicitly passed parameter of the layer applied at ``path``, or why it is not one."""
  wanted = set(paths)

  def passed(variables):
    got = {}

    def record(next_fun, args, kwargs, context, path, explicit):
      if explicit and path in wanted and context.method_name == '__call__':
        for name, value in context.module.variables.get('params', {}).items():
          got.setdefault(f'{path}/{name}', value)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(CallPaths().interceptor(record)):
      model.apply(variables, x, **{**inference_kwargs(model), **apply_kwargs})
    return got

  return find_views(passed, variables)


class _Calls:
  """What one traced forward pass called: the layers (in call order) and how often each
  ran and with which input shapes, every module's class, which BatchNorm directly
  consumes which layer's output, and the attention sites."""

  def __init__(self):
    self.layers: List[LayerInfo] = []
    self.calls: Dict[str, int] = {}     # layer path -> number of calls
    self.modules: Dict[str, str] = {}   # every called module's path -> class name
    self.outputs: Dict[int, str] = {}   # id(output array) -> path of the layer that made it
    self.bn_of: Dict[str, str] = {}     # layer path -> path of the BatchNorm fed by its output
    self.bn_eps: Dict[str, float] = {}
    self.sites: Dict[str, AttentionSite] = {}
    self.site_calls: Dict[str, int] = {}
    self.shapes: Dict[str, set] = {}    # layer path -> {(input shape, geometry)} over calls
    # Layers applied with explicitly passed parameters (a tied head): their paths.
    self.explicit: List[str] = []
    # The ``nn.intercept_methods`` interceptor: records each call, changes nothing.
    self.intercept = CallPaths().interceptor(self._record)

  def _record(self, next_fun, args, kwargs, context, path: str, explicit: bool):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, AttentionCore):
      self.site_calls[path] = self.site_calls.get(path, 0) + 1
      self.sites.setdefault(path, _site(path, args, kwargs))
    elif context.method_name == '__call__' and is_linen_site(module):
      self.modules.setdefault(path, type(module).__name__)
      with attention_fn_swapped(module, functools.partial(self._recorder, path)):
        return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    if context.method_name != '__call__' or not args:
      return y
    self.modules.setdefault(path, type(module).__name__)
    if isinstance(module, nn.BatchNorm):
      producer = None if explicit else self.outputs.get(id(args[0]))
      if (producer is not None and producer not in self.bn_of
          and _normalises_last_axis(module, np.ndim(args[0]))):
        self.bn_of[producer] = path
        self.bn_eps[path] = float(module.epsilon)
      return y
    for cls, handler in _HANDLERS:
      if isinstance(module, cls):
        info = handler(module, path, args[0], y, module.variables['params'])
        if info is not None:   # (None: not a layer this library quantizes: a float op)
          self._layer(path, info, y, explicit)
        break
    return y

  def _layer(self, path: str, info: LayerInfo, y, explicit: bool) -> None:
    self.calls[path] = self.calls.get(path, 0) + 1
    self.shapes.setdefault(path, set()).add((info.input_shape, info.geometry))
    if self.calls[path] == 1:
      self.layers.append(info)
      if explicit:   # (its kernel is another parameter's view: no BatchNorm folds into it)
        self.explicit.append(path)
      elif info.kernel_shape[-1] == np.shape(y)[-1]:   # features last: BN may fold
        self.outputs[id(y)] = path

  def _recorder(self, path: str, original):
    """A Linen attention module's attention function, its call recorded."""
    def record(query, key, value, bias=None, mask=None, **kw):
      self.site_calls[path] = self.site_calls.get(path, 0) + 1
      self.sites.setdefault(path, _site(path, (query, key, value, bias, mask), kw))
      return original(query, key, value, bias=bias, mask=mask, **kw)
    return record


def _normalises_last_axis(module: nn.BatchNorm, ndim: int) -> bool:
  axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  return tuple(sorted(int(a) % ndim for a in axes)) == (ndim - 1,)


def totals(layers: Sequence[LayerInfo]) -> Dict[str, int]:
  """Sum of weight-layer parameters and MACs."""
  return {'params': sum(l.params for l in layers), 'macs': sum(l.macs for l in layers)}
