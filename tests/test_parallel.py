"""The two ways of mapping the per-device steps (pmap, jit of shard_map) on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits as digits_config
from nfnet_jax import models, parallel, steps, train
from nfnet_jax.models import layers

NUM_CLASSES = 10
SIZE = 16
# Native convolutions compile fastest on CPU; both modes trace the same lowering.
CONV_IMPL = 'native'


def tiny_config():
  """A 12-block F0 at 1/16 width on 16x16 images, with stochastic depth and dropout on,
  so that the per-device random streams (axis_index) are part of what is compared."""
  config = digits_config.get_config()
  config.dtype = 'float32'
  config.model.kwargs.update(width=0.0625, group_size=8, stochdepth_rate=0.2, drop_rate=0.2)
  config.optimizer.warmup_epochs = 0.0  # a non-zero learning rate from the first step
  return config


@pytest.fixture(scope='module')
def setup():
  config = tiny_config()
  model = models.build_model(config.model, NUM_CLASSES, config.dtype)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, SIZE)
  # Non-zero skip gains, so that every block's parameters get a gradient.
  state = state._replace(
    params=jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.5 if 'skip_gain' in str(path) else p, state.params
    )
  )
  train_step = steps.make_train_step(model, optimizer, schedule, config, NUM_CLASSES)
  eval_step = steps.make_eval_step(model, NUM_CLASSES)
  return model, jax.device_get(state), train_step, eval_step


def batches(num, devices, per_device, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'images': rng.integers(0, 256, (devices, per_device, SIZE, SIZE, 3), np.uint8),
      'labels': rng.integers(0, NUM_CLASSES, (devices, per_device)).astype(np.int32),
    }
    for _ in range(num)
  ]


def run_train(train_step, state, mode, data, devices):
  """Three steps from `state`; also what each call did to its inputs and outputs."""
  step = parallel.map_train_step(train_step, devices, mode=mode)
  state = parallel.replicate(state, devices)
  layout = parallel.replicated_sharding(devices)
  history, calls = [], []
  for batch in data:
    before = jax.tree.leaves(state)
    with layers.conv_impl(CONV_IMPL):
      state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(devices)))
    calls.append(
      dict(
        inputs_donated=all(x.is_deleted() for x in before),
        outputs_replicated=all(x.sharding == layout for x in jax.tree.leaves((state, metrics))),
      )
    )
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, calls, step


@pytest.fixture(scope='module')
def runs(setup):
  """mode -> (final state, metrics per step, per-call facts, the mapped step)."""
  _, state, train_step, _ = setup
  devices = jax.local_devices()
  data = batches(3, len(devices), 2)
  return {mode: run_train(train_step, state, mode, data, devices) for mode in parallel.MODES}


def test_shard_map_train_steps_equal_pmap_steps(setup, runs):
  state = setup[1]
  (s_state, s_hist, _, _), (p_state, p_hist, _, _) = runs['shard_map'], runs['pmap']
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), s_state.params, state.params)
  assert max(jax.tree.leaves(moved)) > 1e-4, 'the steps should change the params'
  assert int(s_state.step) == int(p_state.step) == 3
  # Both modes run the same per-device body over the same devices, with the same
  # axis_index per device (so the same dropout masks), and in this JAX pmap is itself
  # a jit of a shard_map: the compiled programs agree, and so do the results (they are
  # bit-identical in practice; the tolerance allows for a reordered reduction only).
  for a, b in zip(jax.tree.leaves(s_state), jax.tree.leaves(p_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for s_metrics, p_metrics in zip(s_hist, p_hist):
    assert s_metrics.keys() == p_metrics.keys()
    for key in s_metrics:
      np.testing.assert_allclose(s_metrics[key], p_metrics[key], rtol=1e-6, err_msg=key)


def test_steps_compile_once_and_update_the_state_in_place(runs):
  # Donated: each input state's buffers became the output's. The output layout is
  # `replicate`'s, so the next call neither copies nor recompiles; either mode takes
  # the state the other returns.
  for mode in parallel.MODES:
    assert runs[mode][2] == [dict(inputs_donated=True, outputs_replicated=True)] * 3, mode
  assert runs['shard_map'][3]._cache_size() == 1


def test_eval_steps_of_both_modes_sum_over_every_example(setup):
  model, state, _, eval_step = setup
  devices = jax.local_devices()
  rng = np.random.default_rng(2)
  images = rng.standard_normal((8, 3, SIZE, SIZE, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (8, 3)).astype(np.int32)
  mask = (rng.random((8, 3)) < 0.7).astype(np.float32)
  batch = {'images': images, 'labels': labels, 'mask': mask}
  ema = jax.tree.map(lambda p: 0.5 * p, state.params)

  # Independent: one forward pass over all 24 examples on one device, summed in NumPy.
  flat = images.reshape(24, SIZE, SIZE, 3)
  want, near_ties = {'count': mask.sum()}, {}
  forward = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)['logits'])
  for prefix, params in (('', state.params), ('ema_', ema)):
    with layers.conv_impl(CONV_IMPL):
      logits = np.asarray(forward(params, flat), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(24), labels.ravel()]
    want[prefix + 'loss'] = np.sum(nll * mask.ravel())
    want[prefix + 'top1'] = np.sum((logits.argmax(-1) == labels.ravel()) * mask.ravel())
    # Batches of 3 and of 24 round differently, which can flip a near-tie.
    top2 = np.sort(logits, -1)[:, -2:]
    near_ties[prefix + 'top1'] = np.sum(top2[:, 1] - top2[:, 0] < 1e-4)

  for mode in parallel.MODES:
    step = parallel.map_eval_step(eval_step, devices, mode=mode)
    placed = jax.device_put(batch, parallel.batch_sharding(devices))
    replicated = parallel.replicate((state.params, ema), devices)
    with layers.conv_impl(CONV_IMPL):
      got = jax.device_get(step(*replicated, placed))
    assert float(got['count']) == want['count']
    for key in ('loss', 'ema_loss'):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=f'{mode} {key}')
    for key in ('top1', 'ema_top1'):
      assert abs(float(got[key]) - want[key]) <= near_ties[key], f'{mode} {key}'


def test_mesh_spans_the_given_devices_on_one_automatic_axis():
  devices = jax.local_devices()[:4]
  mesh = parallel.mesh(devices)
  assert mesh.axis_names == (parallel.AXIS,)
  assert list(mesh.devices.flat) == devices
  assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,)
  # The layouts the steps take are built on this same mesh.
  assert parallel.replicated_sharding(devices).mesh == mesh
  assert parallel.batch_sharding(devices).mesh == mesh
  placed = parallel.replicate(jnp.arange(3.0), devices)
  assert placed.sharding.is_fully_replicated and len(placed.sharding.device_set) == 4


def test_unknown_mode_is_refused_with_the_valid_ones():
  with pytest.raises(ValueError, match="'vmap'; valid: shard_map, pmap"):
    parallel.map_train_step(lambda s, b: (s, {}), jax.local_devices(), mode='vmap')
  with pytest.raises(ValueError, match='valid: shard_map, pmap'):
    parallel.map_eval_step(lambda p, e, b: {}, jax.local_devices(), mode='jit')


@pytest.mark.parametrize('mode', parallel.MODES)
@pytest.mark.parametrize('num_devices', [1, 2])
def test_pmean_averages_across_devices_and_skips_the_all_reduce_on_one(mode, num_devices):
  devices = jax.local_devices()[:num_devices]

  def step(state, batch):
    return state, parallel.pmean(jnp.mean(batch))

  mapped = parallel.map_train_step(step, devices, mode=mode)
  state = parallel.replicate(jnp.zeros(3), devices)
  batch = np.arange(num_devices * 4, dtype=np.float32).reshape(num_devices, 4)
  _, mean = mapped(state, batch)
  assert float(mean) == pytest.approx(batch.mean())
  hlo = mapped.lower(state, batch).compile().as_text()
  assert ('all-reduce' in hlo) == (num_devices > 1)
