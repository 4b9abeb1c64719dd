"""The trainer with Haiku model state (batch norm's moving statistics): the steps thread
and synchronise it, SAM's ascent leaves it alone, evaluation uses it, checkpoints and
weights files carry it; a stateless model's step is bit-identical to the stateless
formula; checkpoints without model state still restore; the TF EfficientNet optimiser."""

import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import bn_resnet as bn_resnet_config
from experiments import efficientnet as efficientnet_config
from nfnet_jax import checkpoint as checkpoint_lib
from nfnet_jax import config as config_lib
from nfnet_jax import fused_sgd, losses, models, optim, parallel, steps, train, weights
from nfnet_jax import metrics as metrics_lib
from nfnet_jax.models.batchnorm import BatchNorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
SIZE = 8
BATCH = 16  # global


def tiny_model(bn_sync: str = 'none', stateful: bool = True, dropout: float = 0.0):
  """conv -> (batch norm) -> relu -> mean pool -> dropout -> linear: the smallest model
  with (or without) state, so that the steps compile in seconds."""

  def forward(images, is_training):
    x = hk.Conv2D(4, 3, stride=2, name='conv')(images)
    if stateful:
      x = BatchNorm(0.9, 1e-5, bn_sync, axis_name=parallel.AXIS, name='bn')(x, is_training)
    x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
    if dropout and is_training:
      x = hk.dropout(hk.next_rng_key(), dropout, x)
    return {'logits': hk.Linear(NUM_CLASSES, name='linear')(x)}

  return hk.transform_with_state(forward) if stateful else hk.transform(forward)


def step_config(**optimizer) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.dtype = 'float32'
  config.optimizer.update(**{'warmup_epochs': 0.0, 'clipping': 0.0, **optimizer})
  return config


def make_batch(seed: int = 0, batch: int = BATCH):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), np.uint8)
  labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  return images, labels


def run_step(model, config, num_devices: int, images, labels, state=None):
  """(state before, state after one step) of `model` on `num_devices` devices."""
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  if state is None:
    state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, SIZE)
  devices = jax.local_devices()[:num_devices]
  step = parallel.map_train_step(
    steps.make_train_step(model, optimizer, schedule, config, NUM_CLASSES), devices
  )
  before = jax.device_get(state)
  batch = {
    'images': images.reshape(num_devices, -1, *images.shape[1:]),
    'labels': labels.reshape(num_devices, -1),
  }
  after, _ = step(parallel.replicate(state, devices), batch)
  return before, jax.device_get(after)


def inputs(images):
  return steps.model_inputs(jnp.asarray(images))


def assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def trees_close(a, b, **tol) -> bool:
  return all(
    np.allclose(np.asarray(x), np.asarray(y), **tol)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


# ---------------------------------------------------------------------------
# Batch statistics across devices.
# ---------------------------------------------------------------------------
def test_bn_sync_all_is_the_single_device_step_and_none_is_not():
  """On 8 devices with 2 examples each, bn_sync='all' normalises with the statistics of
  all 16 examples: parameters, optimizer state and moving statistics after the step are
  the single-device step's on the whole batch. 'none' normalises each device's pair
  with its own statistics: another step."""
  images, labels = make_batch()
  config = step_config()
  initial, single = run_step(tiny_model('all'), config, 1, images, labels)
  _, synced = run_step(tiny_model('all'), config, 8, images, labels)
  _, local = run_step(tiny_model('none'), config, 8, images, labels)
  assert not trees_close(single.model_state, initial.model_state)  # the statistics moved
  for field in ('params', 'opt_state', 'ema_params', 'model_state', 'ema_model_state'):
    assert_trees_close(getattr(synced, field), getattr(single, field), rtol=2e-5, atol=1e-6)
  assert not trees_close(local.params, single.params, rtol=1e-4, atol=1e-6)
  # Per-device variances average to less than the whole batch's variance.
  var = lambda s: s.model_state['bn']['moving_variance']  # noqa: E731
  assert not np.allclose(var(local), var(single), rtol=1e-4)
  # The means of the devices' means are the mean of the batch: the moving means agree.
  np.testing.assert_allclose(
    local.model_state['bn']['moving_mean'], single.model_state['bn']['moving_mean'], rtol=1e-5
  )


def test_moving_statistics_are_the_batch_statistics_averaged_over_devices():
  """With per-device statistics the state after one step is the NumPy computation:
  moving = 0.9 * initial + 0.1 * (mean over devices of each device's batch statistic)."""
  images, labels = make_batch(1)
  model = tiny_model('none')
  before, after = run_step(model, step_config(), 8, images, labels)
  conv = before.params['conv']
  x = np.asarray(inputs(images))
  # The conv's output (SAME padding, stride 2), computed with lax independently of Haiku.
  y = jax.lax.conv_general_dilated(
    x, conv['w'], (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  y = np.asarray(y + conv['b'], np.float64).reshape(8, -1, conv['w'].shape[-1])
  means = y.mean(axis=1)
  variances = y.var(axis=1)
  np.testing.assert_allclose(
    after.model_state['bn']['moving_mean'], 0.1 * means.mean(0), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
    after.model_state['bn']['moving_variance'], 0.9 + 0.1 * variances.mean(0), rtol=1e-4
  )
  # The EMA of the state: decay min(max, 1/10) at step 0, from the initial statistics.
  np.testing.assert_allclose(
    after.ema_model_state['bn']['moving_mean'],
    0.9 * after.model_state['bn']['moving_mean'],
    rtol=1e-6,
  )


def test_bn_sync_reaches_the_models_batch_norm_and_stays_out_of_the_signature():
  """config.model.bn_sync is what the registry's batch-normalised models synchronise
  with (a cross-device mean appears in the traced forward pass only for 'all'); it is no
  model argument of the signature, so weights load whatever it is."""
  config = bn_resnet_config.get_config('digits')
  config.model.kwargs.width = 0.125
  x = jnp.zeros((2, 2, 16, 16, 3))

  def traced(bn_sync):
    config.model.bn_sync = bn_sync
    model = models.build_model_with_state(config.model, NUM_CLASSES)
    params, state = model.init(jax.random.PRNGKey(0), x[0], is_training=True)
    apply = lambda images: model.apply(params, state, None, images, is_training=True)  # noqa: E731
    return str(jax.make_jaxpr(jax.vmap(apply, axis_name=parallel.AXIS))(x))

  assert 'psum' in traced('all') and 'psum' not in traced('none')
  assert 'bn_sync' not in models.model_signature(config.model, NUM_CLASSES)
  assert 'model.bn_sync' in train.RUN_DEFINING_FIELDS


def test_bn_sync_is_validated():
  config = bn_resnet_config.get_config('digits')
  config.model.bn_sync = 'some'
  with pytest.raises(ValueError, match='bn_sync'):
    train.validate_config(config)
  nf = config_lib.base_config()
  nf.model.bn_sync = 'all'
  with pytest.raises(ValueError, match='batch-normalised models only'):
    train.validate_config(nf)


# ---------------------------------------------------------------------------
# The stateless path is unchanged.
# ---------------------------------------------------------------------------
def reference_step(model, optimizer, schedule, config):
  """The per-device step of a stateless model as make_train_step wrote it before model
  state existed (hk.Transformed applied without state), written out here."""

  def step_fn(state, batch):
    step, params = state.step, state.params
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, step), jax.lax.axis_index(parallel.AXIS))

    def loss_fn(p):
      logits = model.apply(p, rng, inputs(batch['images']), is_training=True)['logits']
      logits = logits.astype(jnp.float32)
      loss = jnp.mean(
        losses.softmax_cross_entropy(logits, batch['labels'], NUM_CLASSES, config.label_smoothing)
      )
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = jax.lax.pmean(jax.tree.map(lambda g: g.astype(jnp.float32), grads), parallel.AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ema = optim.ema_update(state.ema_params, new_params, step, config.ema_max_decay)
    new_state = steps.TrainState(step + 1, new_params, opt_state, ema, state.rng)
    return new_state, {'loss': jax.lax.pmean(loss, parallel.AXIS)}

  return step_fn


def test_stateless_step_is_bit_identical_to_the_stateless_formula(monkeypatch):
  """A stateless model (`hk.Transformed`, as the NF families are built) through the
  state-threading step: the same parameters, optimizer state and EMA to the bit on 2
  devices (dropout on, so the random streams must match too), no model state, and no
  extra cross-device reduction in the traced step. Both steps run the optax chain: the
  fused CPU pass rounds a few elements differently (tests/test_fused_sgd.py bounds that)."""
  monkeypatch.setenv(fused_sgd.OPT_OUT, '0')
  model = tiny_model(stateful=False, dropout=0.3)
  images, labels = make_batch(2)
  config = step_config(name='sgd_agc', clipping=0.01)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  # On the host: each mapped step donates its own replicated copy.
  state = jax.device_get(steps.init_state(jax.random.PRNGKey(3), model, optimizer, SIZE))
  assert state.model_state == {} and state.ema_model_state == {}
  devices = jax.local_devices()[:2]
  batch = {'images': images.reshape(2, 8, SIZE, SIZE, 3), 'labels': labels.reshape(2, 8)}
  new_fn = steps.make_train_step(model, optimizer, schedule, config, NUM_CLASSES)
  ref_fn = reference_step(model, optimizer, schedule, config)
  new, _ = parallel.map_train_step(new_fn, devices)(parallel.replicate(state, devices), batch)
  ref, _ = parallel.map_train_step(ref_fn, devices)(parallel.replicate(state, devices), batch)
  for field in ('step', 'params', 'opt_state', 'ema_params'):
    for a, b in zip(jax.tree.leaves(getattr(new, field)), jax.tree.leaves(getattr(ref, field))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
  assert new.model_state == {} and new.ema_model_state == {}

  def all_reduces(fn):
    mapped = jax.vmap(fn, in_axes=(None, 0), axis_name=parallel.AXIS)
    jaxpr = str(jax.make_jaxpr(mapped)(state, batch))
    return jaxpr.count('psum') + jaxpr.count('pmean')

  # The reference reduces the gradient and the loss; the step also the metrics.
  metric_reductions = 1  # top1
  assert all_reduces(new_fn) == all_reduces(ref_fn) + metric_reductions


# ---------------------------------------------------------------------------
# SAM, gradient accumulation and evaluation with state.
# ---------------------------------------------------------------------------
def test_sam_ascent_leaves_the_moving_statistics_alone():
  """Under SAM the state after the step is one batch-norm update, the descent pass's: the
  statistics of the whole batch at the perturbed parameters, from the incoming state.
  The ascent (on the first examples) is not chained into it."""
  model = tiny_model()
  images, labels = make_batch(3)
  rho, fraction = 0.5, 0.25
  config = step_config(sam_rho=rho, sam_ascent_fraction=fraction)
  before, after = run_step(model, config, 1, images, labels)
  params, state0 = before.params, before.model_state
  x = inputs(images)
  m = max(1, int(fraction * BATCH))

  def loss(p, s, xs, ys):
    outputs, s = model.apply(p, s, None, xs, is_training=True)
    smoothed = losses.softmax_cross_entropy(
      outputs['logits'], ys, NUM_CLASSES, config.label_smoothing
    )
    return jnp.mean(smoothed), s

  (_, ascent_state), g = jax.value_and_grad(loss, has_aux=True)(params, state0, x[:m], labels[:m])
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda p, v: p + rho * v / norm, params, g)
  _, descent_state = loss(perturbed, state0, x, labels)
  _, chained = loss(perturbed, ascent_state, x, labels)
  assert_trees_close(after.model_state, descent_state, rtol=1e-5, atol=1e-7)
  assert not trees_close(after.model_state, chained, rtol=1e-3)


def test_grad_accumulation_threads_the_state_through_the_micro_batches():
  """With 2 micro-batches the state is updated by the first micro-batch, then by the
  second from there: two consecutive training passes."""
  model = tiny_model()
  images, labels = make_batch(4)
  config = step_config()
  config.train.grad_accum_steps = 2
  before, after = run_step(model, config, 1, images, labels)
  x = inputs(images)
  state = before.model_state
  for half in (slice(0, 8), slice(8, 16)):
    _, state = model.apply(before.params, state, None, x[half], is_training=True)
  assert_trees_close(after.model_state, state, rtol=1e-6, atol=1e-7)


def test_eval_normalises_with_the_moving_statistics():
  """Evaluation applies the model with is_training=False and the given states: each
  example's prediction does not depend on the others in its batch, and the raw and EMA
  halves use their own statistics."""
  model = tiny_model()
  images, labels = make_batch(5)
  before, after = run_step(model, step_config(), 1, images, labels)
  x = inputs(images)
  # Statistics far from the batch's, so that using the batch's would show.
  state = jax.tree.map(lambda v: v + 3.0, after.model_state)
  devices = jax.local_devices()[:2]
  eval_step = parallel.map_eval_step(steps.make_eval_step(model, NUM_CLASSES), devices)
  batch = {
    'images': np.asarray(x).reshape(2, 8, SIZE, SIZE, 3),
    'labels': labels.reshape(2, 8),
    'mask': np.ones((2, 8), np.float32),
  }
  sums = jax.device_get(eval_step(after.params, before.params, batch, (state, before.model_state)))
  for prefix, params, s in (('', after.params, state), ('ema_', before.params, before.model_state)):
    expected = 0.0
    for i in range(BATCH):  # one example at a time: batch statistics would differ
      out, _ = model.apply(params, s, None, x[i : i + 1], is_training=False)
      expected += float(
        losses.softmax_cross_entropy(out['logits'], labels[i : i + 1], NUM_CLASSES)[0]
      )
    np.testing.assert_allclose(sums[prefix + 'loss'], expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------
def test_checkpoint_without_model_state_restores(tmp_path):
  """A checkpoint in the layout written before the train state had model state (its five
  fields) restores into today's state of a stateless model; a stateful state round-trips
  with its model state."""
  model = tiny_model(stateful=False)
  optimizer, _ = train.make_optimizer(step_config(), total_steps=10, steps_per_epoch=5)
  old = steps.init_state(jax.random.PRNGKey(1), model, optimizer, SIZE)
  old_layout = {f: getattr(old, f) for f in ('step', 'params', 'opt_state', 'ema_params', 'rng')}
  old_layout['step'] = jnp.asarray(7, jnp.int32)
  sig = {'family': 'tiny'}
  with checkpoint_lib.Checkpointer(str(tmp_path / 'old'), model_signature=sig) as ckpt:
    ckpt.save(7, old_layout)
    ckpt.wait_until_finished()
    fresh = steps.init_state(jax.random.PRNGKey(2), model, optimizer, SIZE)
    assert train.checkpoint_tree(fresh).keys() == old_layout.keys()
    restored = train.restore(ckpt, fresh)
  assert int(restored.step) == 7 and restored.model_state == {}
  assert_trees_close(restored.params, old.params, rtol=0, atol=0)

  stateful = tiny_model()
  _, trained = run_step(stateful, step_config(), 1, *make_batch(6))
  with checkpoint_lib.Checkpointer(str(tmp_path / 'new'), model_signature=sig) as ckpt:
    ckpt.save(1, train.checkpoint_tree(trained))
    ckpt.wait_until_finished()
    fresh = steps.init_state(jax.random.PRNGKey(2), stateful, optimizer, SIZE)
    assert 'model_state' in train.checkpoint_tree(fresh)
    restored = train.restore(ckpt, fresh)
  for field in ('model_state', 'ema_model_state', 'params'):
    assert_trees_close(getattr(restored, field), getattr(trained, field), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Weights files.
# ---------------------------------------------------------------------------
def test_weights_file_carries_the_model_state(tmp_path):
  """A stateful model's export holds its statistics beside the parameters (read by
  `load_state_for_model`, invisible to the parameter readers); a file without them is
  refused for a stateful model and irrelevant for a stateless one."""
  rng = np.random.default_rng(7)
  params = {'ResNet/~/linear': {'w': rng.normal(size=(3, 2)).astype(np.float32)}}
  state = {
    'ResNet/~/final_bn': {
      'moving_mean': rng.normal(size=3).astype(np.float32),
      'moving_variance': rng.uniform(1, 2, 3).astype(np.float32),
    }
  }
  path = str(tmp_path / 'with_state.npz')
  weights.save_converted(params, path, 'BN-ResNet50', state=state)
  loaded, variant = weights.load_converted(path)
  assert variant == 'BN-ResNet50' and loaded.keys() == params.keys()
  np.testing.assert_array_equal(loaded['ResNet/~/linear']['w'], params['ResNet/~/linear']['w'])
  fresh = jax.tree.map(np.zeros_like, state)
  got = weights.load_state_for_model(path, fresh)
  assert_trees_close(got, state, rtol=0, atol=0)
  assert weights.load_state_for_model(path, {}) == {}

  plain = str(tmp_path / 'params_only.npz')
  weights.save_converted(params, plain, 'BN-ResNet50')
  with pytest.raises(weights.ParamsMismatchError, match='no batch-norm statistics'):
    weights.load_state_for_model(plain, fresh)
  other = {'ResNet/~/final_bn': {k: np.zeros(4, np.float32) for k in state['ResNet/~/final_bn']}}
  with pytest.raises(weights.ParamsMismatchError, match='do not fit'):
    weights.load_state_for_model(path, other)


# ---------------------------------------------------------------------------
# The TF EfficientNet optimiser and schedule.
# ---------------------------------------------------------------------------
def test_rmsprop_tf_is_tf1_rmsprop_with_l2_off_batch_norm():
  """Three steps against TF1's RMSProp update written in NumPy (ms starts at 1, eps in
  the square root, lr inside the momentum), with weight decay on the conv weight only."""
  params = {
    'conv': {'w': np.array([0.5, -1.0], np.float32)},
    'bn': {'scale': np.ones(2, np.float32)},
  }
  lr, decay, momentum, eps, wd = 0.1, 0.9, 0.9, 1e-3, 1e-2
  tx = optim.rmsprop_tf(lr, decay=decay, momentum=momentum, eps=eps, weight_decay=wd)
  state = tx.init(params)
  p = jax.tree.map(np.float64, params)
  ms = jax.tree.map(np.ones_like, p)
  mom = jax.tree.map(np.zeros_like, p)
  current = params
  for t in range(3):
    grads = {
      'conv': {'w': np.array([0.3, t - 1.0], np.float32)},
      'bn': {'scale': np.array([t, 1.0], np.float32)},
    }
    updates, state = tx.update(grads, state, current)
    current = optax.apply_updates(current, updates)
    for module in p:
      name = next(iter(p[module]))
      g = grads[module][name] + (wd * p[module][name] if module == 'conv' else 0.0)
      ms[module][name] = decay * ms[module][name] + (1 - decay) * g**2
      mom[module][name] = momentum * mom[module][name] + lr * g / np.sqrt(ms[module][name] + eps)
      p[module][name] = p[module][name] - mom[module][name]
  assert_trees_close(current, p, rtol=1e-5)


def test_warmup_exponential_schedule_is_tfs():
  """TF's build_learning_rate('exponential'): linear warmup, then a staircase decay that
  counts from step 0 (not from the end of the warmup)."""
  schedule = optim.warmup_exponential_schedule(
    0.016, 512, warmup_steps=10, decay_steps=4.8, decay_rate=0.97
  )
  peak = 0.016 * 512 / 256
  for step in (0, 3, 9, 10, 14, 15, 100):
    expected = peak * step / 10 if step < 10 else peak * 0.97 ** np.floor(step / 4.8)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)


def test_efficientnet_config_is_the_tf_recipe():
  config = efficientnet_config.get_config('B3')
  fam, key, _ = models.model_variant(config.model)
  assert (fam.name, key) == ('EfficientNet', 'B3')
  assert config.data.image_size == fam.variants['B3']['train_imsize'] == 300
  assert config.model.kwargs.drop_rate == fam.variants['B3']['drop_rate'] == 0.3
  optimizer, schedule = train.make_optimizer(config, total_steps=218_949, steps_per_epoch=625.5)
  # Warmup: 5 epochs (3128 steps); then x 0.97 per 2.4 epochs (1501.2 steps) from step 0.
  assert float(schedule(3000)) == pytest.approx(0.016 * 2048 / 256 * 3000 / 3128, rel=1e-5)
  assert float(schedule(4000)) == pytest.approx(0.016 * 2048 / 256 * 0.97**2, rel=1e-5)
  assert config.optimizer.name == 'rmsprop' and config.model.bn_sync == 'tpu'


# ---------------------------------------------------------------------------
# The real trainer, end to end.
# ---------------------------------------------------------------------------
TINY_BN = [
  '--config',
  os.path.join(REPO, 'experiments', 'bn_resnet.py:digits'),
  '--config.model.kwargs.width=0.125',
  '--config.data.image_size=16',
  '--config.train.batch_size=16',
  '--config.train.num_steps=6',
  '--config.train.log_every_steps=1',
  '--config.train.eval_every_steps=1000',
  '--config.eval.batch_size=120',
  '--config.checkpoint.every_steps=2',
]


def _run(args, **env):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', **env)
  return subprocess.run(
    [sys.executable, '-m', *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
  )


@pytest.mark.slow
def test_bn_resnet_trains_resumes_exactly_exports_and_evaluates_with_its_state(tmp_path):
  """A BN-ResNet on digits through the real trainer: killed (SIGKILL) after step 3 and
  resumed, it logs the losses and exports the weights and statistics of the uninterrupted
  run; the statistics moved; the export carries them, and evaluating the export gives the
  run's own final EMA evaluation."""
  reference, resumed = str(tmp_path / 'reference'), str(tmp_path / 'resumed')
  proc = _run(['nfnet_jax.train', *TINY_BN, '--workdir', reference])
  assert proc.returncode == 0, proc.stderr[-3000:]
  killed = _run(
    ['tests.fault_runner', *TINY_BN, '--workdir', resumed], FAULT='kill', FAULT_STEP='3'
  )
  assert killed.returncode == -9
  proc = _run(['nfnet_jax.train', *TINY_BN, '--workdir', resumed])
  assert proc.returncode == 0, proc.stderr[-3000:]

  def curve(workdir):
    records = metrics_lib.read_metrics(workdir)
    return {r['step']: r['loss'] for r in records if 'loss' in r}, records

  (ref_losses, ref_records), (res_losses, _) = curve(reference), curve(resumed)
  assert ref_losses == res_losses and sorted(ref_losses) == list(range(1, 7))
  with (
    np.load(os.path.join(reference, weights.EXPORT_FILE)) as a,
    np.load(os.path.join(resumed, weights.EXPORT_FILE)) as b,
  ):
    assert a.files == b.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    state_keys = [k for k in a.files if k.startswith('__state__/')]
    assert state_keys and all(
      k.rpartition('//')[2] in ('moving_mean', 'moving_variance') for k in state_keys
    )
    variances = [a[k] for k in state_keys if 'moving_variance' in k]
    assert variances and not all(np.allclose(v, 1.0) for v in variances)  # the statistics moved

  config = bn_resnet_config.get_config('digits')
  config.model.kwargs.width = 0.125
  config.data.image_size = 16
  config.train.update(batch_size=16, num_steps=6)
  config.eval.batch_size = 120
  results = train.evaluate(
    config, str(tmp_path / 'eval'), weights=os.path.join(reference, weights.EXPORT_FILE)
  )
  final = [r for r in ref_records if 'eval_ema_top1' in r][-1]
  assert results['eval_top1'] == pytest.approx(final['eval_ema_top1'], abs=1e-6)
  assert results['eval_loss'] == pytest.approx(final['eval_ema_loss'], rel=1e-5)
