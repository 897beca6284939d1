"""Name and layout mapping from a flat ``{torch_name: array}`` to a Flax variable tree.

A mapping lists, for every Flax leaf ``(collection, *path)``, the source name and
a layout rule. PyTorch keeps conv kernels as (out, in/groups, kh, kw) and linear
weights as (out, in); Flax as (kh, kw, in/groups, out) and (in, out). The
conversion is checked against the model's own variable shapes, and every source
tensor must be used or explicitly ignored, so a wrong mapping is an error naming
the tensor, never a silently half-loaded model.

A linear layer after a channel-first flatten (PyTorch's ``x.flatten(1)`` on an
(N, C, H, W) feature map) reads its inputs in (C, H, W) order, while the same Flax
model flattens (N, H, W, C) in (H, W, C) order: shapes match either way, so the rule
``from_nchw(C, H, W)`` must say it, and its rows are permuted accordingly.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, Iterable, Mapping, Tuple, Union

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

FlaxPath = Tuple[str, ...]


class LayoutRule(str, enum.Enum):
  """How a source tensor is rearranged into Flax's layout."""

  COPY = 'copy'      # same layout (biases, norms, embeddings)
  CONV = 'conv'      # (O, I, kh, kw) -> (kh, kw, I, O); depthwise (C, 1, kh, kw) too
  DENSE = 'dense'    # (O, I) -> (I, O)


@dataclasses.dataclass(frozen=True)
class DenseFromNCHW:
  """A (O, C*H*W) linear weight read after a channel-first flatten of (C, H, W)
  features, for a Flax Dense after an (H, W, C) flatten: (H*W*C, O) with permuted rows."""
  channels: int
  height: int
  width: int

  @property
  def value(self) -> str:
    return f'dense_from_nchw{(self.channels, self.height, self.width)}'


def from_nchw(channels: int, height: int, width: int) -> DenseFromNCHW:
  """The layout rule of a linear layer that follows a channel-first flatten."""
  for name, n in (('channels', channels), ('height', height), ('width', width)):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f'from_nchw: {name} must be a positive integer, got {n!r}.')
  return DenseFromNCHW(int(channels), int(height), int(width))


Rule = Union[LayoutRule, DenseFromNCHW, str]


class MappingError(ValueError):
  """Source tensors and the Flax model do not correspond."""


def _rule(rule: Rule) -> Union[LayoutRule, DenseFromNCHW]:
  return rule if isinstance(rule, DenseFromNCHW) else LayoutRule(rule)


def _to_flax(array: np.ndarray, rule: Union[LayoutRule, DenseFromNCHW]) -> np.ndarray:
  if isinstance(rule, DenseFromNCHW):
    c, h, w = rule.channels, rule.height, rule.width
    if array.ndim != 2 or array.shape[1] != c * h * w:
      raise MappingError(f'A {rule.value} weight must be (out, {c * h * w}), got {array.shape}.')
    return array.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
  if rule == LayoutRule.CONV:
    return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))
  if rule == LayoutRule.DENSE:
    return np.transpose(array)
  return array


def _from_flax(array: np.ndarray, rule: Union[LayoutRule, DenseFromNCHW]) -> np.ndarray:
  if isinstance(rule, DenseFromNCHW):
    c, h, w = rule.channels, rule.height, rule.width
    return array.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
  if rule == LayoutRule.CONV:
    n = array.ndim - 2
    return np.transpose(array, (n + 1, n) + tuple(range(n)))
  if rule == LayoutRule.DENSE:
    return np.transpose(array)
  return array


def to_flax_tree(arrays: Mapping[str, np.ndarray],
                 mapping: Mapping[FlaxPath, Tuple[str, Rule]], template: Any,
                 ignore: Iterable[str] = ()) -> Dict[str, Any]:
  """The Flax variable tree ``mapping`` describes, checked against ``template``.

  Args:
    arrays: source tensors by name.
    mapping: ``{(collection, *module_path, leaf): (source_name, rule)}``.
    template: the model's variables or their shapes (``jax.eval_shape(model.init, ...)``).
    ignore: source names deliberately not loaded (e.g. position ids, unused heads).
  """
  expected = flatten_dict(jax.tree.map(lambda a: tuple(a.shape), template,
                                       is_leaf=lambda a: hasattr(a, 'shape')))
  missing_leaves = sorted('/'.join(p) for p in set(expected) - set(mapping))
  extra_leaves = sorted('/'.join(p) for p in set(mapping) - set(expected))
  if missing_leaves or extra_leaves:
    raise MappingError(f'The mapping does not cover the model: no source for '
                       f'{missing_leaves[:5]}; unknown Flax leaves {extra_leaves[:5]}.')
  used = {name for name, _ in mapping.values()}
  unused = sorted(set(arrays) - used - set(ignore))
  if unused:
    raise MappingError(f'{len(unused)} source tensors are not used by the mapping '
                       f'(first {unused[:5]}); map them or pass them in ignore=.')
  out = {}
  for path, (name, rule) in mapping.items():
    if name not in arrays:
      raise MappingError(f'Source tensor {name!r} (for {"/".join(path)}) is not in the file.')
    value = _to_flax(np.asarray(arrays[name]), _rule(rule))
    if tuple(value.shape) != expected[path]:
      raise MappingError(f'{name!r} has shape {np.shape(arrays[name])}, which as '
                         f'{_rule(rule).value} gives {value.shape}; the model\'s '
                         f'{"/".join(path)} needs {expected[path]}.')
    out[path] = np.asarray(value, np.float32) if value.dtype != np.float32 else value
  return unflatten_dict(out)


def from_flax_tree(variables: Any, mapping: Mapping[FlaxPath, Tuple[str, Rule]]
                   ) -> Dict[str, np.ndarray]:
  """The inverse of :func:`to_flax_tree`: source-named tensors in the source layout."""
  flat = flatten_dict(variables)
  return {name: _from_flax(np.asarray(flat[path]), _rule(rule))
          for path, (name, rule) in mapping.items()}
