"""Blocks of a model's quantized forward program, found from its traced graph.

The quantized forward pass is traced once per batch size (``jax.make_jaxpr``), with
every layer call marked as a call of its own. A *cut* is a point of the program where
one value alone carries everything the rest of the program needs from the input: at a
residual block's input the value forks into the block's branch and its skip path, so
there is no cut until the add that joins them. A *block* is the stretch from one cut
to the next that holds at least one layer, with the layer-free stretches after it (the
activation after a layer, the add and activation closing a residual block). So a
residual or inverted-residual block is one block, a plain chain of layers one block
per layer, a transformer layer's attention and MLP halves one block each; no module
name is read. A layer called at several sites whose calls fall in different blocks
joins those blocks and everything between them into one.

:class:`BlockProgram` evaluates one block from a value of its input cut, with the
layer states given as arguments, so a block's output can be computed, and
differentiated, for any states (block-wise reconstruction,
:mod:`ptq_jax.stages.adaquant.block`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from ptq_jax.quant.interceptor import LayerQuant, apply_quantized, quantized_layer_output

_MARK = 'ptq_layer_call_'

# How a layer call computes its output in a block: (path, site, module, x) -> output.
LayerFn = Callable[[str, int, nn.Module, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a layer in the traced program: its path, call site and module."""

  path: str
  site: int
  module: nn.Module


@dataclasses.dataclass(frozen=True)
class Block:
  """A stretch of the program from one cut (the first: the model input) to the next
  (the last: the outputs); its equations at each batch size are that trace's ``ranges``."""

  index: int
  calls: Tuple[int, ...]       # indices into BlockProgram.calls, in program order
  paths: Tuple[str, ...]       # the layers called in the block, each once, in order
  # Whether the block also reads the model input (values it recomputes from it, such as
  # an attention mask), besides its input cut.
  needs_input: bool = False

  @property
  def label(self) -> str:
    return f'block {self.index}: ' + ' + '.join(self.paths)


class _Trace:
  """The program traced at one batch size: its equations, which of them are data (depend
  on the input) and which prelude (data computed without a layer), the values of the
  others, where the layer calls are, and each block's equations."""

  def __init__(self, closed: jex.ClosedJaxpr):
    jaxpr = closed.jaxpr
    self.jaxpr = jaxpr
    if len(jaxpr.invars) != 1:
      raise ValueError('Block-wise reconstruction needs a model with one input array.')
    data = set(jaxpr.invars)
    self.data_eqn = []
    for eqn in jaxpr.eqns:
      is_data = any(_is_var(v) and v in data for v in eqn.invars)
      if is_data:
        data.update(eqn.outvars)
      self.data_eqn.append(is_data)
    # Values of everything that does not depend on the input (constants, parameters).
    env: Dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts))
    with jax.ensure_compile_time_eval():   # (concrete even when traced inside a jit)
      for eqn, is_data in zip(jaxpr.eqns, self.data_eqn):
        if not is_data:
          _bind(eqn, env)
    self.static = env
    self.marks = {}   # equation index -> call index
    for i, eqn in enumerate(jaxpr.eqns):
      name = str(eqn.params.get('name', ''))
      if name.startswith(_MARK):
        self.marks[i] = int(name[len(_MARK):])
    # The prelude: values computed from the input without any layer (an attention mask
    # from token ids, embeddings). Any block can recompute them from the model input.
    pre = set(jaxpr.invars)
    self.pre_eqn = []
    for i, eqn in enumerate(jaxpr.eqns):
      is_pre = self.data_eqn[i] and i not in self.marks and all(
          v in pre for v in eqn.invars if _is_var(v) and v in data)
      if is_pre:
        pre.update(eqn.outvars)
      self.pre_eqn.append(is_pre)
    self.data, self.pre = data, pre
    self.inputs: Dict[int, Any] = {}   # block index -> its input variable (None: block 0)
    self.ranges: List[Tuple[int, int]] = []   # block index -> its equations
    self.preludes: List[List[int]] = []       # block index -> the prelude equations it reads


def _is_var(v) -> bool:
  return not isinstance(v, jex.Literal)


def _read(env, v):
  return v.val if isinstance(v, jex.Literal) else env[v]


def _bind(eqn, env) -> None:
  """Evaluates one equation into ``env`` (JAX's custom-interpreter pattern)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  # (jax < 0.5 returned (subfuns, params); later versions the params alone.)
  subfuns, params = params if isinstance(params, tuple) else ((), params)
  out = eqn.primitive.bind(*subfuns, *[_read(env, v) for v in eqn.invars], **params)
  if not eqn.primitive.multiple_results:
    out = [out]
  for var, value in zip(eqn.outvars, out):
    env[var] = value


class BlockProgram:
  """The quantized forward program of a model, cut into blocks.

  ``qstate`` fixes the state structure the program is traced with (every layer of the
  model, quantized or not, with its entry); the states a block is evaluated with are
  arguments of :meth:`run`. Built from one example batch; traced again, once, for
  every other batch size it is run at (with the same blocks).
  """

  def __init__(self, model: nn.Module, variables: Mapping[str, Any], qstate: Mapping[str, Any],
               folded_bns: frozenset, example: np.ndarray):
    self._forward = lambda hook, x: apply_quantized(model, variables, qstate, folded_bns, x,
                                                    layer_output=hook)
    self._qstate = qstate   # (the trace reads only its structure and shapes)
    self._example_shape = tuple(example.shape[1:])
    self._dtype = example.dtype
    self._traces: Dict[int, _Trace] = {}
    calls: List[LayerCall] = []
    self.calls: Tuple[LayerCall, ...] = ()
    self.blocks: Tuple[Block, ...] = ()
    self._trace(len(example), calls)

  # -- tracing -------------------------------------------------------------------------

  def _trace(self, batch: int, calls: Optional[List[LayerCall]] = None) -> _Trace:
    if batch in self._traces:
      return self._traces[batch]
    record = calls is not None
    counter = [0]

    def hook(path, module, x, site):
      k = counter[0]
      counter[0] += 1
      if record:
        calls.append(LayerCall(path, site, module))

      def layer_call(x):
        return quantized_layer_output(module, self._qstate[path].for_site(site), x)
      layer_call.__name__ = f'{_MARK}{k}'
      return jax.jit(layer_call)(x)

    x = jax.ShapeDtypeStruct((batch,) + self._example_shape, self._dtype)
    closed = jax.make_jaxpr(lambda x: self._forward(hook, x))(x)
    trace = _Trace(closed)
    if record:
      self.calls = tuple(calls)
    blocks = self._find_blocks(trace)
    if not self.blocks:
      self.blocks = blocks
    elif ([(b.calls, b.paths, b.needs_input) for b in blocks] !=
          [(b.calls, b.paths, b.needs_input) for b in self.blocks]):
      raise ValueError(f'The model\'s program cuts into other blocks at batch size {batch} '
                       'than at the first; use layer-wise reconstruction '
                       '(AdaQuantConfig(unit="layer")).')
    self._traces[batch] = trace
    return trace

  def _find_blocks(self, trace: _Trace) -> Tuple[Block, ...]:
    jaxpr = trace.jaxpr
    missing = sorted({c.path for k, c in enumerate(self.calls)} -
                     {self.calls[k].path for k in trace.marks.values()})
    if missing or len(trace.marks) != len(self.calls):
      raise ValueError(f'Layers {missing or "(some calls)"} are computed inside a nested '
                       'program of the model (nn.scan, nn.remat, jax.jit ...), where '
                       'block-wise reconstruction cannot see them; use layer-wise '
                       'reconstruction (AdaQuantConfig(unit="layer")).')
    groups = self._merge_shared(trace, _segments(jaxpr, trace, _cuts(jaxpr, trace)))
    blocks = []
    trace.ranges = [(start, stop) for start, stop, _ in groups]
    for g, (start, stop, _) in enumerate(groups):
      calls = tuple(k for i, k in sorted(trace.marks.items()) if start <= i < stop)
      paths = tuple(dict.fromkeys(self.calls[k].path for k in calls))
      trace.preludes.append(self._prelude(trace, g) if g else [])
      blocks.append(Block(g, calls, paths, bool(trace.preludes[-1])))
    return tuple(blocks)

  def _merge_shared(self, trace: _Trace, groups: List[List[Any]]) -> List[List[Any]]:
    """A layer whose calls fall in several blocks: those blocks and all between, one."""
    merged = True
    while merged:
      merged = False
      where: Dict[str, List[int]] = {}
      for g, (start, stop, _) in enumerate(groups):
        for i, k in trace.marks.items():
          if start <= i < stop:
            where.setdefault(self.calls[k].path, []).append(g)
      for gs in where.values():
        if min(gs) != max(gs):
          a, b = min(gs), max(gs)
          groups[a:b + 1] = [[groups[a][0], groups[b][1], True]]
          merged = True
          break
    return groups

  def _prelude(self, trace: _Trace, index: int) -> List[int]:
    """The prelude equations block ``index`` (> 0) reads, directly or not."""
    jaxpr = trace.jaxpr
    start, stop = trace.ranges[index]
    wanted = {v for i in range(start, stop) if not trace.pre_eqn[i]
              for v in jaxpr.eqns[i].invars if _is_var(v) and v in trace.pre}
    if index == len(trace.ranges) - 1:
      wanted |= {v for v in jaxpr.outvars if _is_var(v) and v in trace.pre}
    needed = []
    for i in range(stop - 1, -1, -1):
      eqn = jaxpr.eqns[i]
      if trace.pre_eqn[i] and any(v in wanted for v in eqn.outvars):
        needed.append(i)
        wanted |= {v for v in eqn.invars if _is_var(v) and v in trace.pre}
    if wanted & set(jaxpr.invars) and not needed:
      return [-1]   # the model input itself, read directly
    return sorted(needed)

  # -- evaluation ----------------------------------------------------------------------

  def run(self, block: Block, x: jnp.ndarray, states: Mapping[str, LayerQuant],
          layer_fn: Optional[LayerFn] = None,
          model_input: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """The block's output for input ``x``: the next cut's value, or for the last block
    the model's outputs, flattened per example and concatenated. ``x`` is a batch of the
    block's input cut values (of model inputs for the first block); ``model_input``, the
    same examples' model inputs, is needed when ``block.needs_input``. Layers compute
    with ``states`` (or ``layer_fn``)."""
    if layer_fn is None:
      layer_fn = lambda path, site, module, x: quantized_layer_output(
          module, states[path].for_site(site), x)
    if block.needs_input and model_input is None:
      raise ValueError(f'{block.label} also reads the model input: pass model_input.')
    trace = self._trace(x.shape[0])
    jaxpr = trace.jaxpr
    env = dict(trace.static)
    start, stop = trace.ranges[block.index]
    if block.index == 0:
      env[jaxpr.invars[0]] = x
    else:
      env[self._input_var(trace, block)] = x
      if block.needs_input:
        env[jaxpr.invars[0]] = model_input
        for i in trace.preludes[block.index]:
          if i >= 0:
            _bind(jaxpr.eqns[i], env)
    for i in range(start, stop):
      eqn = jaxpr.eqns[i]
      if not trace.data_eqn[i] or (block.index and trace.pre_eqn[i]):
        continue
      if i in trace.marks:
        call = self.calls[trace.marks[i]]
        (x_in,) = [_read(env, v) for v in eqn.invars if _is_var(v) and v in trace.data]
        env[eqn.outvars[0]] = layer_fn(call.path, call.site, call.module, x_in)
      else:
        _bind(eqn, env)
    outs = self._output_vars(trace, block)
    values = [_read(env, v) for v in outs]
    if len(values) == 1 and block.index < len(self.blocks) - 1:
      return values[0]
    n = x.shape[0]
    return jnp.concatenate([jnp.reshape(v, (n, -1)).astype(jnp.float32) for v in values], 1)

  def _input_var(self, trace: _Trace, block: Block):
    """The value that crosses into ``block`` (> 0): the one value produced before it
    from a layer's output and used in it."""
    if block.index not in trace.inputs:
      jaxpr = trace.jaxpr
      start, stop = trace.ranges[block.index]
      produced = {v for i in range(start) for v in jaxpr.eqns[i].outvars}
      used = {v for i in range(start, stop) for v in jaxpr.eqns[i].invars
              if _is_var(v) and v in trace.data and v not in trace.pre and v in produced}
      (trace.inputs[block.index],) = used
    return trace.inputs[block.index]

  def _output_vars(self, trace: _Trace, block: Block):
    jaxpr = trace.jaxpr
    if block.index == len(self.blocks) - 1:
      return list(jaxpr.outvars)
    return [self._input_var(trace, self.blocks[block.index + 1])]


def _cuts(jaxpr, trace: _Trace) -> List[int]:
  """The equations after which exactly one data value is live: where blocks end.

  What a cut must carry: values computed from a layer's output, and prelude values a
  layer reads (the embeddings a first attention block starts from); other prelude
  values (a mask every block reads) are recomputed from the model input."""
  layer_inputs = {v for i in trace.marks for v in jaxpr.eqns[i].invars
                  if _is_var(v) and v in trace.pre}
  flow = lambda v: _is_var(v) and v in trace.data and (v not in trace.pre or v in layer_inputs)
  last_use: Dict[Any, int] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if flow(v):
        last_use[v] = i
  for v in jaxpr.outvars:
    if flow(v):
      last_use[v] = len(jaxpr.eqns)
  live: set = set()
  cuts, previous = [], None
  for i, eqn in enumerate(jaxpr.eqns):
    if not trace.data_eqn[i]:
      continue
    live |= {v for v in eqn.outvars if v in last_use}
    live = {v for v in live if last_use[v] > i}
    if len(live) == 1 and i < len(jaxpr.eqns) - 1:
      (cut,) = live
      if cut is not previous and cut not in jaxpr.outvars:
        cuts.append(i)
        previous = cut
  return cuts


def _segments(jaxpr, trace: _Trace, cuts: List[int]) -> List[List[Any]]:
  """[start, stop, has_layer] of each segment between cuts; layer-free segments join
  the block before them (the first ones the block after)."""
  bounds = [-1] + cuts + [len(jaxpr.eqns) - 1]
  groups: List[List[Any]] = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    start, stop = a + 1, b + 1
    has_layer = any(start <= i < stop for i in trace.marks)
    if groups and (not has_layer or not groups[-1][2]):
      groups[-1][1] = stop
      groups[-1][2] = groups[-1][2] or has_layer
    else:
      groups.append([start, stop, has_layer])
  return groups
