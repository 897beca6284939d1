"""Mixed precision: sensitivity table, the python-mip integer program, the mixed model."""

import itertools

import jax
import numpy as np
import pytest

import ptq_jax
from ptq_jax.stages.bias_tuning import kl_to_teacher
from ptq_jax.stages import allocation as alloc
from ptq_jax.quant.quantizer import parse_option
from ptq_jax.stages.sensitivity import SensitivityTable
from tests.test_quant import ToyNet, random_variables

OPTIONS = ('W8A8', 'W4A4', 'W2A4')


@pytest.fixture(scope='module')
def toy_mp(tmp_path_factory):
  model = ToyNet()
  x = jax.random.normal(jax.random.key(7), (32, 12, 12, 3))
  variables = random_variables(model, x)
  cache = str(tmp_path_factory.mktemp('sens_cache'))
  mp = ptq_jax.mixed_precision(model, variables, np.asarray(x), options=OPTIONS,
                               cache_dir=cache, model_name='toy', progress=False)
  return model, variables, np.asarray(x), mp, cache


def random_table(n_layers=4, seed=0, options=((8, 8), (4, 4), (2, 4))):
  rng = np.random.default_rng(seed)
  delta = rng.uniform(0.01, 1.0, (n_layers, len(options)))
  delta = np.sort(delta, axis=1)  # fewer bits, larger loss
  return SensitivityTable(tuple(f'layer{i}' for i in range(n_layers)), tuple(options), delta,
                          delta, 0.0, tuple(int(v) for v in rng.integers(100, 5000, n_layers)),
                          tuple(int(v) for v in rng.integers(10**4, 10**6, n_layers)))


def test_parse_option():
  assert parse_option('W4A8') == (4, 8) and parse_option('3/3') == (3, 3)
  assert parse_option((6, 6)) == (6, 6)
  with pytest.raises(ValueError, match='not supported'):
    parse_option('W1A4')
  with pytest.raises(ValueError, match='not understood'):
    parse_option('four bits')


@pytest.mark.parametrize('seed', range(4))
def test_ip_equals_brute_force(seed):
  table = random_table(seed=seed)
  fp_size = table.fp32_size_bits()
  for pct in (8.0, 13.0, 20.0):
    a = alloc.allocate(table, size_bits=pct / 100 * fp_size)
    best, pick = alloc.brute_force(table, size_bits=pct / 100 * fp_size)
    assert a.predicted_loss == pytest.approx(best, rel=1e-9)
  # Several constraints at once, and the dual (minimum size under a loss budget).
  bops = 0.5 * sum(table.bops(i, 0) for i in range(4))
  a = alloc.allocate(table, size_bits=0.2 * fp_size, bops=bops)
  assert a.predicted_loss == pytest.approx(
      alloc.brute_force(table, size_bits=0.2 * fp_size, bops=bops)[0], rel=1e-9)
  loss_budget = float(np.median(table.delta.sum(axis=0)))
  a = alloc.allocate(table, loss=loss_budget, objective='size_bits')
  assert a.size_bits == pytest.approx(
      alloc.brute_force(table, loss=loss_budget, objective='size_bits')[0])


def test_every_constraint_holds():
  table = random_table(n_layers=6, seed=9)
  for size_pct, bops_pct in itertools.product((10, 14, 25), (1, 3, 10)):
    try:
      a = alloc.allocate(table, **{k: v for k, v in alloc.budgets_from_pct(
          table, size_pct, bops_pct).items()})
    except alloc.InfeasibleBudgetError:
      continue
    assert a.size_pct_of_fp32 <= size_pct + 1e-9
    assert a.bops_pct_of_fp32 <= bops_pct + 1e-9
    assert len(a.choice) == 6 and set(a.choice.values()) <= set(table.options)


def test_infeasible_budget_names_the_smallest_feasible():
  table = random_table()
  smallest = sum(p * 2 for p in table.params)  # every layer at 2-bit weights
  with pytest.raises(alloc.InfeasibleBudgetError, match='smallest feasible') as e:
    alloc.allocate(table, size_bits=smallest - 1)
  assert str(smallest) in str(e.value)
  alloc.allocate(table, size_bits=smallest)  # exactly the minimum is feasible
  with pytest.raises(alloc.InfeasibleBudgetError, match='together'):
    # Each budget alone is feasible, together they are not.
    alloc.allocate(table, size_bits=smallest, loss=float(table.delta[:, 0].sum()),
                   objective='bops')
  with pytest.raises(ValueError, match='at least one budget'):
    alloc.allocate(table)
  with pytest.raises(ValueError, match='both the objective and a budget'):
    alloc.allocate(table, size_bits=smallest, objective='size_bits')


def test_sensitivity_table_is_cached_and_identical(toy_mp):
  model, variables, x, mp, cache = toy_mp
  table = mp.table
  assert table.delta.shape == (len(mp.prepared.layers), len(OPTIONS))
  assert np.all(table.delta > 0) and table.base_loss == pytest.approx(0.0, abs=1e-6)
  # More bits hurt less, for every layer (W8A8 vs W2A4).
  assert np.all(table.raw_delta[:, 0] <= table.raw_delta[:, 2] + 1e-7)
  again = ptq_jax.mixed_precision(model, variables, x, options=OPTIONS, cache_dir=cache,
                                  model_name='toy', progress=False)
  assert again.from_cache and not mp.from_cache
  assert again.timings['sensitivity_seconds'] < table.seconds
  np.testing.assert_array_equal(again.table.delta, table.delta)
  assert again.table.to_json() == table.to_json()
  for option, state in mp.option_states.items():  # the states come back from the cache too
    for path, lq in state.items():
      np.testing.assert_array_equal(again.option_states[option][path].kernel, lq.kernel)
      np.testing.assert_array_equal(again.option_states[option][path].a_quant.range,
                                    lq.a_quant.range)
  # Another option set is another cache entry.
  other = ptq_jax.mixed_precision(model, variables, x, options=OPTIONS[:2], cache_dir=cache,
                                  model_name='toy', progress=False)
  assert other.table.options == ((8, 8), (4, 4))


def test_corrupt_cache_is_refused(toy_mp, tmp_path):
  model, variables, x, _, _ = toy_mp
  ptq_jax.mixed_precision(model, variables, x, options=('W8A8',), cache_dir=str(tmp_path),
                          model_name='toy', progress=False)
  for f in tmp_path.iterdir():
    f.write_bytes(b'garbage')
  with pytest.raises(Exception, match='corrupt|not a|delete'):
    ptq_jax.mixed_precision(model, variables, x, options=('W8A8',), cache_dir=str(tmp_path),
                            model_name='toy', progress=False)


def test_only_layer_l_quantized_matches_a_direct_evaluation(toy_mp):
  """dL[l, b] equals the KL of a model with exactly layer l at option b."""
  model, variables, x, mp, _ = toy_mp
  fp = ptq_jax.quantize(model, variables, x, w_bits=None, a_bits=None, first_last_bits=None,
                        progress=False)
  fp_logits = fp.predict(x)
  for i, j in ((0, 2), (3, 1)):
    path, option = mp.table.paths[i], mp.table.options[j]
    qstate = dict(fp.qstate)
    qstate[path] = mp.option_states[option][path]
    mixed = ptq_jax.QuantizedModel(model, fp.variables, fp.layers, qstate, fp.settings,
                                   fp.input_shape)
    kl = float(kl_to_teacher(fp_logits, mixed.predict(x)))
    assert mp.table.raw_delta[i, j] == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_mixed_model_uses_the_chosen_options(toy_mp):
  model, variables, x, mp, _ = toy_mp
  qm, a = mp.quantize(size_pct=20)
  assert a.size_pct_of_fp32 <= 20
  assert qm.bits() == {p: tuple(o) for p, o in a.choice.items()}
  assert qm.size_bits() == a.size_bits
  # The all-W8A8 choice rebuilds the uniform W8A8 model exactly.
  uniform = mp.uniform('W8A8')
  assert set(uniform.choice.values()) == {(8, 8)} and uniform.size_pct_of_fp32 == 25.0
  w8 = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, first_last_bits=None,
                        progress=False)
  np.testing.assert_allclose(mp.build(uniform).predict(x), w8.predict(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='not among the computed options'):
    mp.uniform('W6A6')


def test_bops_cost_is_macs_times_weight_and_activation_bits():
  """Options with w_bits != a_bits tell MACs*w*a from MACs*w*w or MACs*a*a."""
  table = SensitivityTable(('a', 'b'), ((4, 8), (8, 2)), np.ones((2, 2)), np.ones((2, 2)), 0.0,
                           (100, 10), (1000, 50))
  costs = alloc.cost_matrices(table)
  np.testing.assert_array_equal(costs['bops'], [[1000 * 4 * 8, 1000 * 8 * 2],
                                                [50 * 4 * 8, 50 * 8 * 2]])
  np.testing.assert_array_equal(costs['size_bits'], [[400, 800], [40, 80]])
  picked = alloc.allocation_of(table, [0, 1])
  assert picked.bops_pct_of_fp32 == 100 * (1000 * 32 + 50 * 16) / (32 * 32 * 1050)


def test_cached_states_keep_their_quantizers_symmetry(toy_mp, tmp_path):
  """Catches states reloaded from the cache as asymmetric whatever they were (the cache
  held ranges, not the symmetry): symmetric weights with asymmetric inputs come back so."""
  model, variables, x, _, _ = toy_mp
  ranges = ptq_jax.RangeConfig(weight_symmetric=True)
  run = lambda: ptq_jax.mixed_precision(model, variables, x, options=OPTIONS[:2], ranges=ranges,
                                        cache_dir=str(tmp_path), model_name='toy',
                                        progress=False)
  first, again = run(), run()
  assert again.from_cache and not first.from_cache
  for state in again.option_states.values():
    assert all(lq.w_quant.symmetric and not lq.a_quant.symmetric for lq in state.values())
  qm, _ = again.quantize(size_pct=50)
  np.testing.assert_array_equal(qm.apply(x), first.quantize(size_pct=50)[0].apply(x))
