"""The native CPU optimizer step (`fused_sgd`): the same numbers and state as the optax
chain `optim.sgd_agc` + `optax.apply_updates` + `optim.ema_update`, the train step's use
of it, and its build: no compiler, a failing one, a damaged cache, concurrent builds."""

import logging
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnet_jax import fused_sgd, models, optim, parallel, steps, train
from nfnet_jax.models import layers
from tests.test_optim import _flat, _small_tree, np_sgd_agc_steps
from tests.test_steps import NUM_CLASSES, SIZE, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMA_MAX_DECAY = 0.99999

# Every leaf kind an NFNet has, named as Haiku names them (the masks read the names),
# plus the unit layouts AGC distinguishes: HWIO kernels (one unit per output channel),
# an IO linear, a rank-3 weight, vectors, a padded vector and a scalar (one unit each).
SHAPES = {
  'NFNet/~/stem_conv0': {'w': (3, 3, 3, 8), 'gain': (8,), 'bias': (8,)},
  'NFNet/~/nf_block': {'skip_gain': ()},
  'NFNet/~/nf_block/~/conv1': {'w': (3, 3, 4, 16), 'gain': (1, 1, 1, 16), 'bias': (16,)},
  'NFNet/~/nf_block/~/squeeze_excite/~/linear': {'w': (16, 4), 'b': (4,)},
  'NFNet/~/nf_block/~/attention': {'w': (4, 3, 5)},
  'NFNet/~/nf_block/~/squeeze_excite/~/linear_1': {'w': (1, 16), 'b': (16,)},
  'NFNet/~/linear': {'w': (16, 10), 'b': (10,)},
}


def random_tree(rng, log_scale):
  """Per output unit (last axis), scales spread over four decades: a mix of units that
  AGC clips and units it leaves alone."""
  tree = {}
  for module, leaves in SHAPES.items():
    tree[module] = {}
    for name, shape in leaves.items():
      unit = shape[-1:] if shape else ()
      x = rng.standard_normal(shape) * 10.0 ** (log_scale + rng.uniform(-2, 2, unit))
      tree[module][name] = np.asarray(x, np.float32)
  return tree


def reference_step(tx):
  """The optax chain, the update applied and the EMA: what the train step runs elsewhere."""

  @jax.jit
  def step(grads, opt_state, params, ema_params, count):
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ema = optim.ema_update(ema_params, new_params, count, EMA_MAX_DECAY)
    return new_params, opt_state, ema, optim.update_norm(updates)

  return step


def assert_trees_close(got, want, rtol=2e-6):
  """Leaf by leaf, within `rtol` of the leaf's largest magnitude (a few float32 ulps)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, g, w in zip(
    jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)
  ):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
    assert np.max(np.abs(g - w), initial=0.0) <= rtol * scale, jax.tree_util.keystr(path[0])


def schedule(count):
  return 0.05 + 0.1 * jnp.minimum(count, 3)  # changes over the steps, so `count` matters


@pytest.fixture(autouse=True)
def native_on(monkeypatch):
  monkeypatch.delenv(fused_sgd.OPT_OUT, raising=False)


@settings(max_examples=12, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  clipping=st.one_of(st.none(), st.floats(1e-3, 0.5)),
  momentum=st.floats(0.1, 0.99),
  nesterov=st.booleans(),
  weight_decay=st.sampled_from([0.0, 1e-2]),
  log_pscale=st.floats(-4.0, 1.0),
  log_gscale=st.floats(-4.0, 1.0),
)
def test_fused_step_equals_the_optax_chain(
  seed, clipping, momentum, nesterov, weight_decay, log_pscale, log_gscale
):
  hyper = fused_sgd.Hyperparams(momentum, nesterov, weight_decay, clipping, 1e-3)
  fused = jax.jit(fused_sgd.make_update(hyper, schedule, EMA_MAX_DECAY))
  tx = optim.sgd_agc(schedule, *hyper)
  reference = reference_step(tx)
  rng = np.random.default_rng(seed)
  params = random_tree(rng, log_pscale)
  a = b = (params, tx.init(params), jax.tree.map(np.copy, params))
  for count in range(3):
    grads = random_tree(rng, log_gscale)
    *a, norm_a = fused(grads, a[1], a[0], a[2], count)
    *b, norm_b = reference(grads, b[1], b[0], b[2], count)
    # Same state tree (so checkpoints move between the two paths) and the same numbers.
    assert_trees_close(a, b)
    np.testing.assert_allclose(norm_a, norm_b, rtol=1e-5)


def test_fused_step_matches_a_float64_hand_computation():
  """Against the paper's equations in NumPy (tests/test_optim.py's reference), not optax:
  parameters after two steps, and their EMA `e <- d e + (1 - d) p` with the warm-up decay
  `min(max_decay, (1 + t) / (10 + t))`."""
  rng = np.random.default_rng(7)
  params = _small_tree(rng, 0.1)
  grads = [_small_tree(rng, 1.0, zero_skip_gain=False) for _ in range(2)]
  momentum, wd, clipping, eps = 0.9, 1e-2, 0.01, 1e-3
  hyper = fused_sgd.Hyperparams(momentum, True, wd, clipping, eps)
  lrs = [0.3, 0.2]
  update = jax.jit(fused_sgd.make_update(hyper, lambda c: jnp.where(c == 0, 0.3, 0.2), 0.999))
  state = optim.sgd_agc(schedule, *hyper).init(params)  # any schedule: the same state tree
  p, e = params, params
  got = []
  for t, g in enumerate(grads):
    p, state, e, _ = update(g, state, p, e, t)
    got.append((p, e))
  expected = np_sgd_agc_steps(
    _flat(params), [_flat(g) for g in grads], lrs, momentum, True, wd, clipping, eps
  )
  ema = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  for t, ((p_t, e_t), exp) in enumerate(zip(got, expected)):
    d = min(0.999, (1 + t) / (10 + t))
    ema = {k: d * ema[k] + (1 - d) * exp[k] for k in ema}
    for k in exp:
      np.testing.assert_allclose(_flat(p_t)[k], exp[k], rtol=1e-5, atol=1e-6, err_msg=str(k))
      np.testing.assert_allclose(_flat(e_t)[k], ema[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def _train_step(config, native: bool, monkeypatch):
  monkeypatch.setenv(fused_sgd.OPT_OUT, '1' if native else '0')
  model = models.build_model(config.model, NUM_CLASSES, config.dtype)
  optimizer, schedule_ = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, SIZE)
  devices = jax.local_devices()[:1]
  step = parallel.map_train_step(
    steps.make_train_step(model, optimizer, schedule_, config, NUM_CLASSES), devices
  )
  return step, parallel.replicate(state, devices)


def test_train_step_runs_the_native_pass_on_cpu_with_the_optax_numbers(monkeypatch):
  config = tiny_config()
  rng = np.random.default_rng(0)
  batch = {
    'images': rng.integers(0, 256, (1, 8, SIZE, SIZE, 3), np.uint8),
    'labels': rng.integers(0, NUM_CLASSES, (1, 8)).astype(np.int32),
  }
  results = {}
  with layers.conv_impl('native'):
    for native in (True, False):
      step, state = _train_step(config, native, monkeypatch)
      hlo = step.lower(state, batch).compile().as_text()
      assert (f'"{fused_sgd.TARGET}"' in hlo) == native
      for _ in range(2):
        state, metrics = step(state, batch)
      results[native] = jax.device_get((state, metrics))
  (fused_state, fused_metrics), (ref_state, ref_metrics) = results[True], results[False]
  assert int(fused_state.step) == 2
  for field in ('params', 'opt_state', 'ema_params'):
    assert_trees_close(getattr(fused_state, field), getattr(ref_state, field), rtol=1e-5)
  assert set(fused_metrics) == set(ref_metrics)
  for k in ref_metrics:
    np.testing.assert_allclose(fused_metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  assert float(fused_metrics['update_norm']) > 0


def test_other_states_and_dtypes_take_the_optax_chain():
  hyper = fused_sgd.Hyperparams(0.9, True, 1e-2, 0.01, 1e-3)
  update = fused_sgd.make_update(hyper, schedule, EMA_MAX_DECAY)
  params = random_tree(np.random.default_rng(0), 0.0)
  grads = random_tree(np.random.default_rng(1), 0.0)
  adam_state = optax.adam(1e-3).init(params)
  assert update(grads, adam_state, params, params, 0) is None
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  state = optim.sgd_agc(schedule, *hyper).init(bf16)
  assert update(grads, state, bf16, bf16, 0) is None
  # Without momentum there is no trace to update: the chain's own state, optax's path.
  assert fused_sgd.make_update(hyper._replace(momentum=0.0), schedule, EMA_MAX_DECAY) is None


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
  """`load` forgets its result, builds into an empty cache, and is forgotten again after."""
  monkeypatch.setenv(fused_sgd.CACHE_ENV, str(tmp_path / 'cache'))
  fused_sgd.load.cache_clear()
  yield tmp_path / 'cache'
  fused_sgd.load.cache_clear()


def test_opt_out_takes_the_optax_chain(monkeypatch):
  monkeypatch.setenv(fused_sgd.OPT_OUT, '0')
  hyper = fused_sgd.Hyperparams(0.9, True, 1e-2, 0.01, 1e-3)
  assert fused_sgd.make_update(hyper, schedule, EMA_MAX_DECAY) is None


def test_without_a_compiler_training_falls_back_with_one_warning(fresh_load, monkeypatch, caplog):
  monkeypatch.setenv('CXX', '/nonexistent/c++')
  hyper = fused_sgd.Hyperparams(0.9, True, 1e-2, 0.01, 1e-3)
  with caplog.at_level(logging.WARNING):
    assert fused_sgd.make_update(hyper, schedule, EMA_MAX_DECAY) is None
    assert fused_sgd.make_update(hyper, schedule, EMA_MAX_DECAY) is None
  warnings = [r.getMessage() for r in caplog.records if 'optax chain' in r.getMessage()]
  assert len(warnings) == 1 and '/nonexistent/c++' in warnings[0], warnings
  assert not fresh_load.exists()


def test_a_failing_build_falls_back_and_leaves_no_file(fresh_load, monkeypatch, tmp_path, caplog):
  broken = tmp_path / 'broken-c++'
  broken.write_text('#!/bin/sh\necho "fatal error: out of disk space" >&2\nexit 1\n')
  broken.chmod(0o755)
  monkeypatch.setenv('CXX', str(broken))
  with caplog.at_level(logging.WARNING):
    assert not fused_sgd.load()
  assert any('out of disk space' in r.getMessage() for r in caplog.records)
  assert list(fresh_load.iterdir()) == []  # neither a library nor a half-written temporary


def test_a_damaged_cached_library_is_built_again(fresh_load):
  compiler = fused_sgd._compiler()
  path = fused_sgd.library_path(compiler)
  os.makedirs(os.path.dirname(path))
  with open(path, 'wb') as f:
    f.write(b'\x7fELF truncated by a full disk')
  lib = fused_sgd.open_library(compiler)
  assert lib.NfnetFusedSgd
  with open(path, 'rb') as f:
    assert f.read(4) == b'\x7fELF' and len(f.read()) > 10_000


@pytest.mark.slow
def test_concurrent_first_uses_share_one_build(tmp_path):
  """Two processes that start on an empty cache at once both get a working library, and
  the cache ends with that one file (each built into its own temporary, renamed in)."""
  env = dict(os.environ, **{fused_sgd.CACHE_ENV: str(tmp_path)})
  code = 'from nfnet_jax import fused_sgd; assert fused_sgd.load()'
  procs = [
    subprocess.Popen([sys.executable, '-c', code], env=env, cwd=REPO, stderr=subprocess.PIPE)
    for _ in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()[-2000:]
  assert [f.name for f in tmp_path.iterdir()] == [
    os.path.basename(fused_sgd.library_path(fused_sgd._compiler()))
  ]
