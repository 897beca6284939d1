"""The quantized forward pass: the unmodified model run under an interceptor.

Each traced conv/dense layer's computation is swapped for its quantized one,
``f(Q(W) Q(x) + b)`` with the folded weights, and each folded BatchNorm becomes
the identity. The layer itself is computed by a parameter-free clone of the
original module, so strides, padding, groups and dilation keep Flax's exact
semantics. One mechanism serves evaluation, calibration capture and (later)
sequential AdaQuant, BN tuning and bias tuning.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
from flax import struct

from ptq_jax.calling import inference_kwargs
from ptq_jax.linear import (LayerGeometry, apply_linear, flatten_input, geometry_of,
                            unflatten_output)
from ptq_jax.attention_sites import AttentionCore, attention_fn_swapped, is_linen_site
from ptq_jax.quant.attention import AttentionQuant, quantized_attention
from ptq_jax.matmul_sites import model_root, scoped_modules
from ptq_jax.quant.matmuls import MatmulQuant, apply_with_sites, quantized_matmul
from ptq_jax.quant.quantizer import QuantizerState, fake_quant, reshape_for
from ptq_jax.param_views import ParamView
from ptq_jax.trace import LAYER_TYPES, CallPaths


@struct.dataclass
class LayerQuant:
  """Everything one quantized layer computes with (a pytree)."""

  kernel: jnp.ndarray                      # continuous folded weight
  bias: jnp.ndarray                        # folded bias (float)
  w_quant: Optional[QuantizerState] = None  # per output channel; None: float weights
  a_quant: Optional[QuantizerState] = None  # per tensor on the layer input; None: float input
  # Per-input-channel smoothing s (dense layers): the layer computes Q(x / s) Q(s W),
  # equal to x W in float; None: no smoothing. Set by RangeConfig(smooth_alpha=...).
  smooth: Optional[jnp.ndarray] = None
  # A layer called at several sites (shared weights): the input quantizers of its 2nd,
  # 3rd, ... call (``a_quant`` is the first's); empty for a layer called once.
  site_a_quants: Tuple[Optional[QuantizerState], ...] = ()
  # A tied layer (applied with another parameter's view as its kernel): that view. Its
  # quantized kernel is written back into the parameter, so every other use of it (the
  # embedding lookup) reads the same quantized weights. None: the layer's own kernel.
  view: Optional[ParamView] = struct.field(pytree_node=False, default=None)

  def for_site(self, site: int) -> 'LayerQuant':
    """The layer as its ``site``-th call (0-based) computes it: its own input quantizer,
    the shared kernel and weight quantizer."""
    if site == 0 or not self.site_a_quants:
      return self
    return self.replace(a_quant=self.site_a_quants[site - 1], site_a_quants=())


def site_key(path: str, site: int) -> str:
  """The name under which a layer's ``site``-th call reports its input (``on_layer``):
  the path for the first call, ``path#k`` for the others."""
  return path if site == 0 else f'{path}#{site}'


# Layer path -> LayerQuant; with quantize_matmuls also attention path -> AttentionQuant.
QState = Dict[str, Any]


def layer_states(qstate: Mapping[str, Any]) -> Dict[str, LayerQuant]:
  """The layers' entries of a quantization state (its attention entries left out)."""
  return {p: v for p, v in qstate.items() if isinstance(v, LayerQuant)}


def smoothed_kernel(lq: LayerQuant) -> jnp.ndarray:
  """The kernel the weight quantizer sees: ``s W`` (rows scaled), or ``W``."""
  return lq.kernel if lq.smooth is None else lq.kernel * lq.smooth[:, None]


def quantized_weight(lq: LayerQuant) -> jnp.ndarray:
  """The fake-quantized (smoothed) kernel, or the float one if weights are not
  quantized."""
  kernel = smoothed_kernel(lq)
  if lq.w_quant is None:
    return kernel
  return fake_quant(kernel, reshape_for(lq.w_quant, kernel.ndim))


def effective_weight(lq: LayerQuant) -> jnp.ndarray:
  """The kernel the layer computes with in float terms: ``Q(s W) / s`` (``W`` for float
  weights); what a tied layer writes back into its parameter."""
  weight = quantized_weight(lq)
  return weight if lq.smooth is None else weight / lq.smooth[:, None]


def tied_variables(variables: Mapping[str, Any], qstate: Mapping[str, Any],
                   weight: Callable[[str, LayerQuant], jnp.ndarray] = None
                   ) -> Mapping[str, Any]:
  """``variables`` with each tied layer's weight (``weight(path, lq)``, default
  :func:`effective_weight`) written back into the parameter its kernel views
  (unchanged when ``qstate`` has no tied layer). A float kernel is written back too: a
  stage may have changed it (bias tuning of every weight)."""
  tied = {p: lq for p, lq in layer_states(qstate).items() if lq.view is not None}
  if not tied:
    return variables
  params = variables['params']
  for path, lq in tied.items():
    params = lq.view.write(params, effective_weight(lq) if weight is None
                           else weight(path, lq))
  return {**variables, 'params': params}


def quantized_input(lq: LayerQuant, x: jnp.ndarray) -> jnp.ndarray:
  """The fake-quantized (smoothed: ``x / s``) layer input, or ``x`` if activations are
  not quantized."""
  if lq.smooth is not None:
    x = x / lq.smooth
  return x if lq.a_quant is None else fake_quant(x, reshape_for(lq.a_quant, x.ndim))


def layer_forward(module: nn.Module, x: jnp.ndarray, kernel: jnp.ndarray,
                  bias: jnp.ndarray) -> jnp.ndarray:
  """``module``'s linear map with the given kernel, plus ``bias``, in float32.

  Computed by :func:`ptq_jax.linear.apply_linear` from the module's geometry; a
  module without a plain ``lax`` equivalent runs as a parameter-free clone of itself.
  """
  x = jnp.asarray(x, jnp.float32)
  geom = layer_geometry(module, x.shape, kernel.shape)
  if geom is not None:
    return apply_linear(geom, x, kernel) + bias
  clone = module.clone(parent=None, use_bias=False, dtype=jnp.float32,
                       param_dtype=jnp.float32)
  return clone.apply({'params': {'kernel': kernel}}, x) + bias


def layer_geometry(module: nn.Module, x_shape, kernel_shape) -> Optional[LayerGeometry]:
  """The plain ``lax`` form of ``module`` on inputs of ``x_shape`` (None: none). A
  DenseGeneral in the layer table is a Dense on its flattened input."""
  if isinstance(module, nn.DenseGeneral):
    return LayerGeometry('dense')
  return geometry_of(module, tuple(x_shape), tuple(kernel_shape))


def quantized_layer_output(module: nn.Module, lq: LayerQuant, x: jnp.ndarray) -> jnp.ndarray:
  """``Q(W) Q(x) + b`` for one layer (before any activation)."""
  return layer_forward(module, quantized_input(lq, x), quantized_weight(lq), lq.bias)


def make_interceptor(qstate: Mapping[str, Any], folded_bns: frozenset,
                     on_layer: Optional[Callable[[str, jnp.ndarray], None]] = None,
                     layer_output: Optional[Callable[[str, nn.Module, jnp.ndarray, int],
                                                     jnp.ndarray]] = None,
                     on_operand: Optional[Callable[[str, str, jnp.ndarray], None]] = None,
                     attention_fn: Callable = quantized_attention,
                     on_module: Optional[Callable[[str, nn.Module], None]] = None):
  """An ``nn.intercept_methods`` interceptor applying ``qstate``.

  ``on_layer(key, x)``, if given, is called with each quantized layer's float
  input before quantization (used to capture calibration activations); ``key`` is
  :func:`site_key` (the path, or ``path#k`` for the k-th further call of a shared layer).
  ``layer_output(path, module, x, site)``, if given, replaces how a layer in ``qstate``
  computes its output at call ``site`` (the sensitivity pass gates quantization per
  layer with it).
  ``on_operand(path, name, x)``, if given, is called with every attention site's matmul
  operands (:data:`~ptq_jax.quant.attention.OPERANDS`) before quantization; the sites
  then compute their attention explicitly.
  ``attention_fn`` computes a quantized attention site (the deployed program's integer
  one, say) with :func:`~ptq_jax.quant.attention.quantized_attention`'s signature.
  ``on_module(path, module)``, if given, sees every module call (the matmul sites are
  named after the modules they run in).
  """
  if layer_output is None:
    layer_output = lambda path, module, x, site: quantized_layer_output(
        module, qstate[path].for_site(site), x)
  calls: Dict[str, int] = {}   # per traced forward pass: a layer's calls so far

  def attention(path: str):
    """The attention function of site ``path``, or None to leave it untouched."""
    quant = qstate.get(path)
    if not isinstance(quant, AttentionQuant) and on_operand is None:
      return None
    hook = None if on_operand is None else (lambda name, x: on_operand(path, name, x))
    return lambda *a, **k: attention_fn(
        *a, quant=quant if isinstance(quant, AttentionQuant) else None, on_operand=hook, **k)

  def intercepted(next_fun, args, kwargs, context, path, explicit):
    del explicit
    module = context.module
    if context.method_name != '__call__' or not args or not path:
      return next_fun(*args, **kwargs)
    if on_module is not None:
      on_module(path, module)
    if isinstance(module, AttentionCore) or is_linen_site(module):
      fn = attention(path)
      if fn is None:
        return next_fun(*args, **kwargs)
      if isinstance(module, AttentionCore):
        return fn(*args, **kwargs)
      with attention_fn_swapped(module, lambda original: fn):
        return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and path in folded_bns:
      return args[0]
    if isinstance(qstate.get(path), LayerQuant) and isinstance(module, LAYER_TYPES):
      site = calls.get(path, 0)
      calls[path] = site + 1
      x = flatten_input(module, args[0])   # a DenseGeneral's contracted axes in one
      if on_layer is not None:
        on_layer(site_key(path, site), x)
      out = unflatten_output(module, args[0].ndim, layer_output(path, module, x, site))
      return out.astype(module.dtype) if module.dtype is not None else out
    return next_fun(*args, **kwargs)

  return CallPaths().interceptor(intercepted)


def apply_quantized(model: nn.Module, variables: Mapping[str, Any],
                    qstate: Mapping[str, Any], folded_bns: frozenset,
                    x: jnp.ndarray, on_layer=None, layer_output=None, on_operand=None,
                    attention_fn: Callable = quantized_attention,
                    matmul: Callable = quantized_matmul, matmul_operands: bool = True,
                    tied_weight: Optional[Callable[[str, LayerQuant], jnp.ndarray]] = None,
                    **apply_kwargs) -> jnp.ndarray:
  """Runs ``model`` on ``x`` with every layer, attention site and matmul site in
  ``qstate`` quantized (hooks as :func:`make_interceptor`'s; ``on_operand`` also sees the
  matmul sites' operands, :mod:`ptq_jax.matmul_sites`). ``attention_fn`` and ``matmul``
  compute a quantized attention site and matmul site (:mod:`ptq_jax.quant.matmuls`).
  ``matmul_operands=False``: ``on_operand`` sees the attention sites' operands only (the
  program is not evaluated for matmul sites unless ``qstate`` quantizes one).
  A tied layer's quantized weight (``tied_weight(path, lq)``, default
  :func:`effective_weight`) replaces the parameter its kernel views
  (:func:`tied_variables`)."""
  kwargs = {**inference_kwargs(model), **apply_kwargs}
  variables = tied_variables(variables, qstate, tied_weight)
  sites = {p: q for p, q in qstate.items() if isinstance(q, MatmulQuant)}
  if not sites and (on_operand is None or not matmul_operands):
    with nn.intercept_methods(make_interceptor(qstate, folded_bns, on_layer, layer_output,
                                               on_operand, attention_fn)):
      return model.apply(variables, x, **kwargs)
  modules: Dict[str, str] = dict(scoped_modules(model))
  covered = set()

  def on_module(path, module):
    modules.setdefault(path, type(module).__name__)
    if isinstance(module, (AttentionCore, LAYER_TYPES)) or is_linen_site(module):
      covered.add(path)

  def run(x, on_layer_, on_operand_):
    with nn.intercept_methods(make_interceptor(qstate, folded_bns, on_layer_, layer_output,
                                               on_operand_, attention_fn, on_module)):
      return model.apply(variables, x, **kwargs)
  return apply_with_sites(run, x, model_root(model), modules, covered, sites, on_layer,
                          on_operand, matmul)
