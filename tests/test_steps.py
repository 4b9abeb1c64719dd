"""Gradient accumulation in the per-device train step, and the benchmark's memory figures
(8 simulated CPU devices)."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import digits as digits_config
from nfnet_jax import benchmark, models, parallel, steps, train
from nfnet_jax.models import layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
SIZE = 16
BATCH = 16  # global


def tiny_config(accum_steps: int = 1):
  """A 12-block F0 at 1/16 width with AGC on and no stochastic depth or dropout, so that
  one step is a deterministic function of the batch however it is split."""
  config = digits_config.get_config()
  config.dtype = 'float32'
  config.model.kwargs.update(width=0.0625, group_size=8, stochdepth_rate=0.0, drop_rate=0.0)
  config.optimizer.warmup_epochs = 0.0  # a non-zero learning rate from the first step
  config.train.grad_accum_steps = accum_steps
  return config


def one_step(accum_steps: int, num_devices: int, soft_labels: bool):
  """(initial state, state after one step, metrics) on the same 16 examples."""
  config = tiny_config(accum_steps)
  model = models.build_model(config.model, NUM_CLASSES, config.dtype)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, SIZE)
  # Non-zero skip gains, so that every parameter gets a gradient.
  state = state._replace(
    params=jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.5 if 'skip_gain' in str(path) else p, state.params
    )
  )
  initial = jax.device_get(state)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8)
  if soft_labels:  # MixUp-style label distributions: two classes per example
    a, b = rng.integers(0, NUM_CLASSES, (2, BATCH))
    lam = rng.uniform(0.2, 0.8, (BATCH, 1))
    labels = (lam * np.eye(NUM_CLASSES)[a] + (1 - lam) * np.eye(NUM_CLASSES)[b]).astype(np.float32)
  else:
    labels = rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)
  per_device = BATCH // num_devices
  batch = {
    'images': images.reshape(num_devices, per_device, SIZE, SIZE, 3),
    'labels': labels.reshape(num_devices, per_device, *labels.shape[1:]),
  }
  devices = jax.local_devices()[:num_devices]
  step = parallel.map_train_step(
    steps.make_train_step(model, optimizer, schedule, config, NUM_CLASSES), devices
  )
  # Native convolutions compile fastest on CPU; every case traces the same lowering.
  with layers.conv_impl('native'):
    new_state, metrics = step(parallel.replicate(state, devices), batch)
  return initial, jax.device_get(new_state), jax.device_get(metrics)


_ONE_PASS = {}


def one_pass(soft_labels: bool):
  """The reference: one device, the whole batch in one forward and backward pass."""
  if soft_labels not in _ONE_PASS:
    _ONE_PASS[soft_labels] = one_step(1, 1, soft_labels)
  return _ONE_PASS[soft_labels]


@pytest.mark.parametrize(
  'accum_steps,num_devices,soft_labels',
  [(2, 1, False), (4, 4, False), (4, 1, True)],
)
def test_accumulated_step_equals_one_pass_over_the_batch(accum_steps, num_devices, soft_labels):
  initial, want_state, want_metrics = one_pass(soft_labels)
  _, state, metrics = one_step(accum_steps, num_devices, soft_labels)
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), want_state.params, initial.params)
  assert max(jax.tree.leaves(moved)) > 1e-4, 'the step should change the params'
  # The same update up to float32 summation order: micro-batch gradients are summed
  # in another order than one pass sums the examples.
  for name in ('params', 'ema_params', 'opt_state'):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
      getattr(state, name),
      getattr(want_state, name),
    )
  assert int(state.step) == 1
  for key in ('loss', 'top1', 'grad_norm', 'update_norm', 'agc_clip_fraction'):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=2e-5, err_msg=key)
  # AGC clipped some units: the accumulated gradient went through it as one gradient.
  assert 0 < want_metrics['agc_clip_fraction'] < 1


def test_step_metrics_describe_the_step():
  """param_norm is the norm of the parameters the step started from; update_norm the
  norm of the change it made; both against float64 NumPy of the trees themselves."""
  initial, state, metrics = one_pass(False)
  leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]  # noqa: E731
  param_norm = np.sqrt(sum(np.sum(x**2) for x in leaves(initial.params)))
  change = np.sqrt(
    sum(np.sum((a - b) ** 2) for a, b in zip(leaves(state.params), leaves(initial.params)))
  )
  np.testing.assert_allclose(metrics['param_norm'], param_norm, rtol=1e-5)
  np.testing.assert_allclose(metrics['update_norm'], change, rtol=1e-4)
  assert metrics['grad_norm'] > 0


def test_batch_that_does_not_split_into_micro_batches_is_refused():
  config = tiny_config(accum_steps=4)
  model = models.build_model(config.model, NUM_CLASSES, config.dtype)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, SIZE)
  step = parallel.map_train_step(
    steps.make_train_step(model, optimizer, schedule, config, NUM_CLASSES), jax.local_devices()[:1]
  )
  batch = {
    'images': np.zeros((1, 6, SIZE, SIZE, 3), np.uint8),
    'labels': np.zeros((1, 6), np.int32),
  }
  with pytest.raises(ValueError, match=r'batch of 6 .*grad_accum_steps=4'):
    step(state, batch)


class RecordingModel:
  """A linear classifier that reports the uniform number its rng key draws, per call,
  from inside the compiled step (jax.debug.callback)."""

  def __init__(self):
    self.draws = []

  def apply(self, params, rng, images, is_training):
    del is_training
    jax.debug.callback(self.draws.append, jax.random.uniform(rng))
    features = jnp.mean(images, axis=(1, 2))
    return {'logits': features @ params['w']}


def test_micro_batches_draw_their_own_random_numbers_in_one_scan():
  config = tiny_config(accum_steps=4)
  config.optimizer.clipping = 0.0
  model = RecordingModel()
  optimizer = optax.sgd(0.1)
  params = {'w': jnp.zeros((3, NUM_CLASSES))}
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ema_params=jax.tree.map(jnp.copy, params),  # own buffers: the step donates both
    rng=jax.random.PRNGKey(0),
  )
  train_step = steps.make_train_step(model, optimizer, lambda s: 0.1, config, NUM_CLASSES)
  batch = {'images': jnp.zeros((8, SIZE, SIZE, 3)), 'labels': jnp.zeros((8,), jnp.int32)}
  # The micro-batches run in a loop (one scan of 4 iterations), not unrolled 4 times.
  jaxpr = jax.make_jaxpr(train_step, axis_env=[(parallel.AXIS, 1)])(state, batch)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert [e.params['length'] for e in scans] == [4]

  devices = jax.local_devices()[:2]
  step = parallel.map_train_step(train_step, devices)
  step(
    parallel.replicate(state, devices), jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), batch)
  )
  jax.effects_barrier()
  # 2 devices x 4 micro-batches, each with its own key.
  assert len(model.draws) == 8
  assert len({float(d) for d in model.draws}) == 8


def test_benchmark_reports_the_compiled_steps_memory_with_and_without_remat(tmp_path, capsys):
  out = tmp_path / 'memory.csv'
  tiny = [
    '--config=' + os.path.join(REPO, 'experiments', 'digits.py'),
    '--config.model.kwargs.width=0.0625',
    '--config.model.kwargs.group_size=8',
    '--image-size=16',
    '--batch-per-device=2',
    '--num-devices=2',
    '--num-classes=10',
    '--dtype=float32',
    '--parallel=shard_map',
    '--conv-impl=native',  # compiles fastest on CPU
  ]
  assert benchmark.main([*tiny, '--memory', f'--csv={out}']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('F0 train: batch 2/device x 2 ') and ', remat' not in lines[0]
  assert lines[1].startswith('F0 train: batch 2/device x 2 ') and ', remat: ' in lines[1]
  assert all('peak' in line and 'MiB/device' in line for line in lines[:2])
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert [row['remat'] for row in rows] == ['False', 'True']
  mib = [{k: float(row[k]) for k in benchmark.MEMORY_FIELDS} for row in rows]

  # Independent: what the step takes per device is the replicated train state and one
  # device's share of the batch (float32 images, int32 labels, float32 mask).
  config = tiny_config()
  model = models.build_model(config.model, NUM_CLASSES, config.dtype)
  optimizer, _ = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = jax.eval_shape(lambda: steps.init_state(jax.random.PRNGKey(0), model, optimizer, SIZE))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  batch_bytes = 2 * SIZE * SIZE * 3 * 4 + 2 * 4 + 2 * 4
  for figures in mib:
    assert figures['argument_mib'] == pytest.approx((state_bytes + batch_bytes) / 2**20, abs=1e-3)
    # The donated state is updated in place: its outputs alias the arguments.
    assert figures['alias_mib'] == pytest.approx(state_bytes / 2**20, abs=1e-3)
    assert figures['temp_mib'] > 0
    assert figures['peak_mib'] == pytest.approx(
      figures['argument_mib'] + figures['output_mib'] - figures['alias_mib'] + figures['temp_mib'],
      abs=3e-3,
    )
