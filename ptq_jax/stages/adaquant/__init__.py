"""AdaQuant: layer-wise reconstruction of quantized layers (docs/method.md, "AdaQuant").

* :mod:`.config`: the method's hyper-parameters and the runtime settings, apart;
* :mod:`.layer`: one layer's loss, optimiser and compiled programs;
* :mod:`.driver`: the whole model, in parallel or sequential mode, over devices and hosts.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax

from ptq_jax.quant.interceptor import QState
from ptq_jax.stages.adaquant.config import MODES, AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.adaquant.driver import run_adaquant
from ptq_jax.stages.prepare import Prepared, Stage


def adaquant_stage(mode: str = 'parallel', config: Optional[AdaQuantConfig] = None,
                   runtime: Optional[AdaQuantRuntime] = None,
                   devices: Optional[Sequence[Any]] = None) -> Stage:
  """The AdaQuant stage: every quantized layer reconstructed from the state it gets
  (calibrated ranges, usually). Its report is the per-layer list of
  :func:`run_adaquant`."""
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is not one of {MODES}.')
  config = config or AdaQuantConfig()
  runtime = runtime or AdaQuantRuntime()

  def apply(prepared: Prepared, qstate: QState, key: jax.Array) -> Tuple[QState, Any]:
    return run_adaquant(prepared, qstate, mode, config, key, runtime, devices)
  return Stage('adaquant', apply)


__all__ = ['MODES', 'AdaQuantConfig', 'AdaQuantRuntime', 'adaquant_stage', 'run_adaquant']
