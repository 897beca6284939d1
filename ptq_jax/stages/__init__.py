"""Stages: each a pure ``(prepared, qstate, key) -> (qstate, report)`` (:class:`Stage`),
composed into pipelines by :mod:`ptq_jax.recipes`. Every constructor a hand-made
pipeline needs is here, from one place:

    from ptq_jax import stages
    prepared = stages.prepare(model, variables, calib)
    for name, qstate, report, seconds in stages.run_stages(prepared, [
        stages.ranges_stage(stages.BitsRule(4, 4, first_last_bits=8)),
        stages.adaquant_stage('sequential'), stages.bn_tuning_stage()], jax.random.key(0)):
      ...
"""

from ptq_jax.stages.adaquant import adaquant_stage
from ptq_jax.stages.attention import attention_stage
from ptq_jax.stages.bias_tuning import bias_tuning_stage
from ptq_jax.stages.bn_tuning import bn_tuning_stage
from ptq_jax.stages.prepare import Prepared, Stage, prepare, run_stages
from ptq_jax.stages.ranges import BitsRule, ranges_stage
from ptq_jax.stages.stage_guard import guarded

__all__ = ['Prepared', 'Stage', 'prepare', 'run_stages', 'BitsRule', 'ranges_stage',
           'adaquant_stage', 'attention_stage', 'bn_tuning_stage', 'bias_tuning_stage',
           'guarded']
