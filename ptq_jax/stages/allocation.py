"""Bit allocation by integer programming with python-mip (docs/method.md).

Binary ``x[l, b]`` picks one option per layer (``sum_b x[l, b] = 1``). Any mix of
constraints, each ``sum cost * x <= budget``:

* ``size_bits``: weight storage, ``params_l * w_bits``;
* ``bops``: bit-operations per example, ``MACs_l * w_bits * a_bits``;
* ``loss``: the predicted loss ``sum dL[l, b] * x[l, b]``.

The objective minimises the predicted loss (primal) or the size / BOPs (dual, with a
loss budget). An infeasible problem raises :class:`InfeasibleBudgetError`, which
gives the smallest feasible value of each budget on its own.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from ptq_jax.quant.quantizer import Option, option_name
from ptq_jax.stages.sensitivity import SensitivityTable
from ptq_jax.validate import check_number

OBJECTIVES = ('loss', 'size_bits', 'bops')


class InfeasibleBudgetError(ValueError):
  """No choice of options meets the budgets; the message names the smallest feasible ones."""


@dataclasses.dataclass(frozen=True)
class Allocation:
  """One option per layer and what the table predicts for it."""

  choice: Dict[str, Option]
  predicted_loss: float
  size_bits: int
  bops: int
  size_pct_of_fp32: float
  bops_pct_of_fp32: float
  objective: str
  budgets: Dict[str, float]
  solve_seconds: float

  def overrides(self) -> Dict[str, Dict[str, int]]:
    """``quantize(..., overrides=...)`` form of the choice."""
    return {p: {'w_bits': w, 'a_bits': a} for p, (w, a) in self.choice.items()}

  def counts(self) -> Dict[str, int]:
    """How many layers took each option."""
    out: Dict[str, int] = {}
    for option in self.choice.values():
      out[option_name(option)] = out.get(option_name(option), 0) + 1
    return out


def cost_matrices(table: SensitivityTable) -> Dict[str, np.ndarray]:
  """(layers, options) matrices of every constrainable quantity."""
  n, m = len(table.paths), len(table.options)
  return {
      'loss': np.asarray(table.delta, np.float64),
      'size_bits': np.array([[table.size_bits(i, j) for j in range(m)] for i in range(n)],
                            np.float64),
      'bops': np.array([[table.bops(i, j) for j in range(m)] for i in range(n)], np.float64),
  }


def _check_budgets(table: SensitivityTable, budgets: Mapping[str, Optional[float]]
                   ) -> Dict[str, float]:
  given = {k: check_number(v, f'Budget {k}', minimum=0.0) for k, v in budgets.items()
           if v is not None}
  if not given:
    raise ValueError('Give at least one budget: size_bits, bops or loss (or a *_pct form).')
  return given


def budgets_from_pct(table: SensitivityTable, size_pct: Optional[float] = None,
                     bops_pct: Optional[float] = None) -> Dict[str, Optional[float]]:
  """Size / BOPs budgets as percentages of the FP32 model's."""
  size_pct = None if size_pct is None else check_number(size_pct, 'size_pct', minimum=0.0)
  bops_pct = None if bops_pct is None else check_number(bops_pct, 'bops_pct', minimum=0.0)
  return {'size_bits': None if size_pct is None else size_pct / 100 * table.fp32_size_bits(),
          'bops': None if bops_pct is None else bops_pct / 100 * table.fp32_bops()}


def allocate(table: SensitivityTable, size_bits: Optional[float] = None,
             bops: Optional[float] = None, loss: Optional[float] = None,
             objective: str = 'loss', max_seconds: float = 60.0) -> Allocation:
  """Solves the integer program; see the module docstring.

  Raises:
    InfeasibleBudgetError: with the smallest feasible value of each given budget.
  """
  import mip  # Imported here: only bit allocation needs the solver.

  if objective not in OBJECTIVES:
    raise ValueError(f'objective must be one of {OBJECTIVES}, got {objective!r}.')
  budgets = _check_budgets(table, {'size_bits': size_bits, 'bops': bops, 'loss': loss})
  if objective in budgets:
    raise ValueError(f'{objective!r} is both the objective and a budget; minimise one '
                     'quantity subject to budgets on the others.')
  costs = cost_matrices(table)
  n, m = costs['loss'].shape
  # Necessary conditions, one budget at a time: the cheapest option of every layer.
  minimal = {k: float(costs[k].min(axis=1).sum()) for k in budgets}
  too_small = {k: v for k, v in budgets.items() if v < minimal[k] * (1 - 1e-12)}
  if too_small:
    raise InfeasibleBudgetError(_infeasible_message(table, budgets, minimal, too_small))
  start = time.time()
  model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
  model.verbose = 0
  model.threads = 1  # deterministic
  x = [[model.add_var(var_type=mip.BINARY) for _ in range(m)] for _ in range(n)]
  for i in range(n):
    model += mip.xsum(x[i]) == 1
  # Costs are scaled to O(1) so the solver's tolerances mean the same for every budget.
  for name, budget in budgets.items():
    scale = max(float(np.abs(costs[name]).max()), 1e-30)
    model += mip.xsum(costs[name][i, j] / scale * x[i][j]
                      for i in range(n) for j in range(m)) <= budget / scale
  obj_scale = max(float(np.abs(costs[objective]).max()), 1e-30)
  model.objective = mip.minimize(mip.xsum(costs[objective][i, j] / obj_scale * x[i][j]
                                          for i in range(n) for j in range(m)))
  status = model.optimize(max_seconds=max_seconds)
  seconds = time.time() - start
  if status == mip.OptimizationStatus.INFEASIBLE or model.num_solutions == 0:
    raise InfeasibleBudgetError(_infeasible_message(table, budgets, minimal, budgets,
                                                    jointly=True))
  if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
    raise RuntimeError(f'The bit-allocation solver stopped with status {status.name}.')
  picks = [int(np.argmax([x[i][j].x for j in range(m)])) for i in range(n)]
  return allocation_of(table, picks, objective, budgets, seconds)


def allocation_of(table: SensitivityTable, picks, objective: str = 'loss',
                  budgets: Optional[Dict[str, float]] = None, seconds: float = 0.0
                  ) -> Allocation:
  """The :class:`Allocation` that picks option index ``picks[i]`` for layer ``i``."""
  costs = cost_matrices(table)
  rows = np.arange(len(picks))
  size = int(costs['size_bits'][rows, picks].sum())
  bops = int(costs['bops'][rows, picks].sum())
  return Allocation(
      choice={p: table.options[j] for p, j in zip(table.paths, picks)},
      predicted_loss=float(costs['loss'][rows, picks].sum()), size_bits=size, bops=bops,
      size_pct_of_fp32=100.0 * size / table.fp32_size_bits(),
      bops_pct_of_fp32=100.0 * bops / table.fp32_bops(), objective=objective,
      budgets=dict(budgets or {}), solve_seconds=seconds)


def _infeasible_message(table, budgets, minimal, offending, jointly=False) -> str:
  def describe(name, value):
    if name == 'size_bits':
      return f'{value:.0f} bits ({100 * value / table.fp32_size_bits():.2f}% of FP32)'
    if name == 'bops':
      return f'{value:.4g} BOPs ({100 * value / table.fp32_bops():.3f}% of FP32)'
    return f'{value:.4g}'
  parts = [f'{k} budget {describe(k, budgets[k])} < smallest feasible {describe(k, minimal[k])}'
           for k in offending if budgets[k] < minimal[k] * (1 - 1e-12)]
  if jointly or not parts:
    return ('No option per layer meets these budgets together (' + ', '.join(
        f'{k} <= {describe(k, v)}' for k, v in budgets.items()) + '); each alone is feasible '
        'down to ' + ', '.join(f'{k} {describe(k, minimal[k])}' for k in budgets) +
        '. Loosen one of them.')
  return ('Infeasible bit-allocation budget: ' + '; '.join(parts) + '. Raise the budget to at '
          'least that, or add lower-bit options.')


def brute_force(table: SensitivityTable, size_bits: Optional[float] = None,
                bops: Optional[float] = None, loss: Optional[float] = None,
                objective: str = 'loss') -> Tuple[float, Tuple[int, ...]]:
  """Exhaustive search (small tables only, for tests): the best objective value and
  option indices, or ``(inf, ())`` when nothing is feasible."""
  import itertools
  costs = cost_matrices(table)
  budgets = {k: v for k, v in {'size_bits': size_bits, 'bops': bops, 'loss': loss}.items()
             if v is not None}
  n, m = costs['loss'].shape
  best, best_pick = float('inf'), ()
  rows = np.arange(n)
  for pick in itertools.product(range(m), repeat=n):
    if any(costs[k][rows, pick].sum() > v * (1 + 1e-9) for k, v in budgets.items()):
      continue
    value = costs[objective][rows, pick].sum()
    if value < best - 1e-12:
      best, best_pick = float(value), tuple(pick)
  return best, best_pick
