"""SAM (arXiv 2010.01412) as the NFNet paper uses it (arXiv 2102.06171 appendix A.4): the
gradient rule against NumPy, and the train step against a per-device hand computation on
1 and 2 simulated CPU devices, in both mapping modes."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import digits as digits_config
from experiments import nfnet as nfnet_config
import nfnet_jax
from nfnet_jax import data, losses, models, optim, parallel, sam, steps, train
from nfnet_jax.models import layers

NUM_CLASSES = 10


# ---------------------------------------------------------------------------
# sam_value_and_grad on linear regression, against NumPy in float64.
# ---------------------------------------------------------------------------
def linreg_loss(params, batch):
  pred = batch['x'] @ params['w'] + params['b']
  return jnp.mean((pred - batch['y']) ** 2), pred


def np_linreg(w, b, x, y):
  """Mean squared error and its gradients, by hand."""
  r = x @ w + b - y
  return np.mean(r**2), 2 * x.T @ r / len(y), 2 * np.mean(r)


def linreg_problem(n, seed=0):
  rng = np.random.default_rng(seed)
  params = {'w': rng.normal(size=3).astype(np.float32), 'b': np.asarray(0.3, np.float32)}
  batch = {'x': rng.normal(size=(n, 3)).astype(np.float32)}
  batch['y'] = (batch['x'] @ [1.0, -2.0, 0.5] + rng.normal(size=n)).astype(np.float32)
  return params, batch


@pytest.mark.parametrize('n,fraction,rho', [(10, 0.2, 0.05), (7, 0.1, 0.5), (5, 1.0, 0.2)])
def test_sam_value_and_grad_equals_a_hand_computation(n, fraction, rho):
  params, batch = linreg_problem(n)
  x, y = batch['x'].astype(np.float64), batch['y'].astype(np.float64)
  w, b = params['w'].astype(np.float64), float(params['b'])
  m = max(1, int(fraction * n))  # 10 -> 2, 7 -> 1 (int(0.7) = 0), 5 -> 5
  _, gw, gb = np_linreg(w, b, x[:m], y[:m])
  norm = np.sqrt(np.sum(gw**2) + gb**2)  # one norm over both leaves
  w2, b2 = w + rho * gw / norm, b + rho * gb / norm
  want_loss, want_gw, want_gb = np_linreg(w2, b2, x, y)

  (loss, pred), grads = nfnet_jax.sam_value_and_grad(linreg_loss, rho, fraction, has_aux=True)(
    params, batch
  )
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grads['w'], want_gw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads['b'], want_gb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pred, x @ w2 + b2, rtol=1e-5, atol=1e-6)  # aux: the descent pass
  # Without aux: the same loss and gradient.
  plain = lambda p, bt: linreg_loss(p, bt)[0]  # noqa: E731
  loss2, grads2 = jax.jit(sam.sam_value_and_grad(plain, rho, fraction))(params, batch)
  np.testing.assert_allclose(loss2, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grads2['w'], want_gw, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
  n=st.integers(1, 32),
  rho=st.floats(1e-3, 10.0),
  fraction=st.floats(1e-3, 1.0),
  seed=st.integers(0, 2**16),
)
def test_perturbation_has_norm_rho_and_comes_from_the_first_examples(n, rho, fraction, seed):
  # Example i touches parameter i alone, with weight c_i: the ascent gradient on the first
  # m examples is (c_0, ..., c_{m-1}, 0, ...) / m, so the perturbation shows which examples
  # it came from. The parameters are two leaves, so the norm must be global.
  rng = np.random.default_rng(seed)
  c = rng.uniform(0.5, 2.0, n).astype(np.float32)
  batch = {'onehot': np.eye(n, dtype=np.float32), 'c': c}
  p0 = rng.normal(size=n).astype(np.float32)
  params = {'a': p0[: n // 2], 'b': p0[n // 2 :]}
  seen = []

  def loss_fn(params, batch):
    seen.append(batch['c'].shape[0])
    flat = jnp.concatenate([params['a'], params['b']])
    return jnp.mean(batch['c'] * (batch['onehot'] @ flat)), flat

  # A new jitted function per example, so that it is traced (and `seen` filled) each time.
  sam_fn = jax.jit(sam.sam_value_and_grad(loss_fn, rho, fraction, has_aux=True))
  (loss, perturbed), grads = sam_fn(params, batch)
  m = max(1, int(fraction * n))
  assert seen == [m, n]  # the ascent pass on the first m examples, the descent on all
  e = np.asarray(perturbed, np.float64) - p0
  want = np.zeros(n)
  want[:m] = rho * c[:m] / np.linalg.norm(c[:m].astype(np.float64))
  np.testing.assert_allclose(e, want, rtol=2e-4, atol=1e-6 * (1 + np.abs(p0).max()))
  np.testing.assert_allclose(np.linalg.norm(e), rho, rtol=2e-4)
  # The descent: the whole batch's loss and gradient at the perturbed parameters.
  np.testing.assert_allclose(loss, np.mean(c * (p0 + want)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.concatenate([grads['a'], grads['b']]), c / n, rtol=1e-6)


def test_zero_ascent_gradient_gives_no_perturbation_and_no_nan():
  loss_fn = lambda p, batch: jnp.mean(batch) * jnp.sum(p['w'] ** 2)  # noqa: E731
  loss, grads = sam.sam_value_and_grad(loss_fn, 0.05)({'w': jnp.zeros(3)}, jnp.ones(5))
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grads['w'], np.zeros(3))


def test_bad_arguments_are_refused_in_one_line():
  for rho, fraction, match in ((-0.1, 0.2, 'rho must be >= 0'), (0.05, 0.0, r'in \(0, 1\]')):
    with pytest.raises(ValueError, match=match):
      sam.sam_value_and_grad(linreg_loss, rho, fraction)
  with pytest.raises(ValueError, match=r'in \(0, 1\]; got 1.5'):
    sam.sam_value_and_grad(linreg_loss, 0.05, 1.5)
  params, batch = linreg_problem(6)
  with pytest.raises(ValueError, match=r'one leading example axis; got leading sizes \[5, 6\]'):
    sam.sam_value_and_grad(linreg_loss, 0.05, has_aux=True)(params, {**batch, 'y': batch['y'][:5]})


def test_composes_with_agc_and_any_optax_optimizer():
  # The docstring's example: AGC -> SGD with momentum, fed SAM gradients.
  params, batch = linreg_problem(64, seed=1)
  tx = optax.chain(nfnet_jax.adaptive_grad_clip(0.3), optax.sgd(0.05, momentum=0.9))
  grad_fn = jax.jit(nfnet_jax.sam_value_and_grad(linreg_loss, rho=0.05, has_aux=True))
  opt_state = tx.init(params)
  first = None
  for _ in range(100):
    (loss, _), grads = grad_fn(params, batch)
    first = loss if first is None else first
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  # Least squares reaches the noise floor (the residual of the exact solution).
  x, y = batch['x'].astype(np.float64), batch['y'].astype(np.float64)
  a = np.c_[x, np.ones(len(y))]
  floor = np.mean((a @ np.linalg.lstsq(a, y, rcond=None)[0] - y) ** 2)
  final, _, _ = np_linreg(np.asarray(params['w'], np.float64), float(params['b']), x, y)
  assert first > 3 * floor and final < 1.01 * floor


# ---------------------------------------------------------------------------
# The train step, against a per-device hand computation.
# ---------------------------------------------------------------------------
class MLP:
  """A two-layer classifier of the per-image mean colour, named like a Haiku model (AGC
  clips `hidden`, not the classifier weight). With `drop`, each example's hidden units are
  kept or dropped with one Bernoulli draw (as stochastic depth draws per example); `masks`
  records every draw from inside the compiled step, `traces` the forward passes traced."""

  def __init__(self, drop=False):
    self.drop, self.masks, self.traces = drop, [], 0

  def init(self, seed=0):
    rng = np.random.default_rng(seed)
    return {
      'MLP/~/hidden': {'w': rng.normal(0, 1, (3, 8)), 'b': rng.normal(0, 0.1, 8)},
      'MLP/~/linear': {'w': rng.normal(0, 0.5, (8, NUM_CLASSES)), 'b': np.zeros(NUM_CLASSES)},
    }

  def apply(self, params, rng, images, is_training):
    assert is_training
    self.traces += 1
    h = jnp.tanh(jnp.mean(images, axis=(1, 2)) @ params['MLP/~/hidden']['w'])
    h = h + params['MLP/~/hidden']['b']
    if self.drop:
      keep = jax.random.bernoulli(rng, 0.5, (h.shape[0], 1))
      jax.debug.callback(self.masks.append, keep[:, 0])
      h = h * keep
    return {'logits': h @ params['MLP/~/linear']['w'] + params['MLP/~/linear']['b']}


def step_config(rho, fraction=0.25, accum_steps=1):
  config = digits_config.get_config()
  config.dtype = 'float32'
  config.optimizer.update(warmup_epochs=0.0, sam_rho=rho, sam_ascent_fraction=fraction)
  config.train.grad_accum_steps = accum_steps
  return config


def initial_state(params, optimizer, seed=0):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  # On the host: each mapped step gets its own device copy (it donates the state).
  return jax.device_get(
    steps.TrainState(
      step=jnp.asarray(3, jnp.int32),  # not the first step: the key folds in the step
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree.map(lambda x: x * 0.9, params),
      rng=jax.random.PRNGKey(seed),
    )
  )


def make_batch(devices, per_device, size, seed=0, soft_labels=True):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (devices, per_device, size, size, 3), np.uint8)
  if soft_labels:  # MixUp-style: two classes per example, as the mixed batches carry
    a, b = rng.integers(0, NUM_CLASSES, (2, devices, per_device))
    lam = rng.uniform(0.2, 0.8, (devices, per_device, 1))
    eye = np.eye(NUM_CLASSES)
    labels = (lam * eye[a] + (1 - lam) * eye[b]).astype(np.float32)
  else:
    labels = rng.integers(0, NUM_CLASSES, (devices, per_device)).astype(np.int32)
  return {'images': images, 'labels': labels}


def hand_steps(model, optimizer, config, state, batch, ascents=('own',)):
  """The SAM step written out, once per kind of ascent: per device d, its key, the ascent
  gradient of its first examples, the perturbation (NumPy), the descent gradient of all its
  examples there; then the mean over devices, the optimizer at the unperturbed params, the
  EMA. Returns (params, opt_state, ema_params) per entry of `ascents`.

  `'own'` is the paper's; `'synced'` (the cross-device mean of the ascent gradients) and
  `'none'` (no perturbation) are the alternatives it did not use, to show that the tests
  tell them apart."""
  rho, fraction = config.optimizer.sam_rho, config.optimizer.sam_ascent_fraction
  params, step = state.params, state.step
  mean = np.asarray(data.MEAN_RGB, np.float32)
  std = np.asarray(data.STDDEV_RGB, np.float32)
  devices = batch['images'].shape[0]

  def loss(p, images, labels, key):
    logits = model.apply(p, key, images, True)['logits']
    return jnp.mean(
      losses.softmax_cross_entropy(logits, labels, NUM_CLASSES, config.label_smoothing)
    )

  def update(grads):
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return (
      new_params,
      opt_state,
      optim.ema_update(state.ema_params, new_params, step, config.ema_max_decay),
    )

  grad, update = jax.jit(jax.grad(loss)), jax.jit(update)
  mean_over_devices = lambda trees: jax.tree.map(lambda *x: np.mean(x, axis=0), *trees)  # noqa: E731
  per_device = []
  for d in range(devices):
    key = jax.random.fold_in(jax.random.fold_in(state.rng, step), d)
    images = (batch['images'][d].astype(np.float32) - mean) / std
    labels = batch['labels'][d]
    m = max(1, int(fraction * len(labels)))
    g = jax.device_get(grad(params, images[:m], labels[:m], key))
    per_device.append((key, images, labels, g))
  synced = mean_over_devices([g for *_, g in per_device])
  results = []
  for ascent in ascents:
    descents = []
    for key, images, labels, g in per_device:
      g = {'own': g, 'synced': synced, 'none': None}[ascent]
      perturbed = params
      if g is not None:
        norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(g)))
        scale = np.float32(rho / norm)
        perturbed = jax.tree.map(lambda p, x, s=scale: p + s * x, params, g)
      descents.append(jax.device_get(grad(perturbed, images, labels, key)))
    results.append(jax.device_get(update(mean_over_devices(descents))))
  return results


def run_step(model, optimizer, schedule, config, state, batch, mode='shard_map'):
  devices = jax.local_devices()[: batch['images'].shape[0]]
  train_step = steps.make_train_step(model, optimizer, schedule, config, NUM_CLASSES)
  step = parallel.map_train_step(train_step, devices, mode=mode)
  with layers.conv_impl('native'):  # compiles fastest on CPU
    new_state, metrics = step(parallel.replicate(state, devices), batch)
  return jax.device_get(new_state), jax.device_get(metrics)


def max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def assert_state_close(state, want, rtol=2e-5, atol=1e-6):
  for got, expected in zip((state.params, state.opt_state, state.ema_params), want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, expected)


@pytest.mark.parametrize('mode', parallel.MODES)
def test_two_devices_each_ascend_on_their_own_examples(mode):
  config = step_config(rho=0.5, fraction=0.25)
  model = MLP()
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = initial_state(model.init(), optimizer)
  # Device 0's first two examples are dark, device 1's bright: their ascent gradients
  # point different ways.
  batch = make_batch(2, 8, 4)
  batch['images'][0, :2] //= 4
  batch['images'][1, :2] = 255 - batch['images'][1, :2] // 4
  new_state, metrics = run_step(model, optimizer, schedule, config, state, batch, mode)
  want, *alternatives = hand_steps(
    model, optimizer, config, state, batch, ('own', 'synced', 'none')
  )
  assert_state_close(new_state, want)
  assert int(new_state.step) == 4 and np.isfinite(metrics['loss'])
  # What the test tells apart: a synchronised ascent, or none, is another update.
  for alternative in alternatives:
    assert max_diff(new_state.params, alternative[0]) > 100 * max_diff(new_state.params, want[0])


@pytest.mark.slow  # compiles a narrow F0's SAM step and its hand computation: minutes on CPU
def test_sam_nfnet_step_equals_a_hand_computation():
  # A narrow F0 with stochastic depth and dropout on (the ascent's random draws are part
  # of what is compared), MixUp-style soft labels, AGC, 2 devices.
  config = step_config(rho=0.3, fraction=0.25)
  config.model.kwargs.update(width=0.0625, group_size=8, stochdepth_rate=0.2, drop_rate=0.2)
  model = models.build_model(config.model, NUM_CLASSES, config.dtype)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, 16)
  # Non-zero skip gains, so that every block's parameters get a gradient.
  params = jax.tree_util.tree_map_with_path(
    lambda path, p: p + 0.5 if 'skip_gain' in str(path) else p, state.params
  )
  state = initial_state(params, optimizer)
  batch = make_batch(2, 4, 16)
  new_state, metrics = run_step(model, optimizer, schedule, config, state, batch)
  with layers.conv_impl('native'):
    want, unperturbed = hand_steps(model, optimizer, config, state, batch, ('own', 'none'))
  assert_state_close(new_state, want, rtol=1e-4, atol=1e-6)
  assert max_diff(new_state.params, unperturbed[0]) > 30 * max_diff(new_state.params, want[0])
  assert 0 < metrics['agc_clip_fraction'] < 1


def test_ascent_draws_the_masks_its_examples_draw_in_the_descent():
  config = step_config(rho=0.5, fraction=0.5)
  model = MLP(drop=True)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = initial_state(model.init(), optimizer)
  batch = make_batch(1, 16, 4)
  new_state, _ = run_step(model, optimizer, schedule, config, state, batch)
  jax.effects_barrier()
  ascent, descent = sorted(model.masks, key=len)  # one draw per pass: 8 and 16 examples
  assert len(ascent) == 8 and len(descent) == 16 and 0 < np.sum(descent) < 16
  np.testing.assert_array_equal(ascent, descent[:8])
  assert_state_close(new_state, hand_steps(model, optimizer, config, state, batch)[0])


def test_accumulated_micro_batches_ascend_like_devices():
  # The paper mimics devices with gradient accumulation: K micro-batches on one device
  # take the step K devices take (the model draws no random numbers, so the keys, which
  # fold in the micro-batch index instead of the device index, do not matter).
  model = MLP()
  config = step_config(rho=0.5, fraction=0.25)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = initial_state(model.init(), optimizer)
  batch = make_batch(2, 8, 4)
  on_devices, _ = run_step(model, optimizer, schedule, config, state, batch)
  one_device = jax.tree.map(lambda x: x.reshape(1, 16, *x.shape[2:]), batch)
  accumulated, _ = run_step(
    model, optimizer, schedule, step_config(0.5, 0.25, accum_steps=2), state, one_device
  )
  assert_state_close(accumulated, (on_devices.params, on_devices.opt_state, on_devices.ema_params))
  no_accum, _ = run_step(model, optimizer, schedule, config, state, one_device)
  assert max_diff(no_accum.params, on_devices.params) > 1e-4


def reference_step(model, optimizer, schedule, config):
  """The train step without SAM, written out in the test: what make_train_step did before
  SAM existed."""

  def loss_fn(params, images, labels, rng):
    logits = model.apply(params, rng, images, is_training=True)['logits'].astype(jnp.float32)
    loss = jnp.mean(
      losses.softmax_cross_entropy(logits, labels, NUM_CLASSES, config.label_smoothing)
    )
    return loss, logits

  def train_step(state, batch):
    rng = jax.random.fold_in(
      jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(parallel.AXIS)
    )
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, steps.model_inputs(batch['images']), batch['labels'], rng
    )
    grads = jax.lax.pmean(jax.tree.map(lambda g: g.astype(jnp.float32), grads), parallel.AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params, state.step, config.ema_max_decay)
    new_state = steps.TrainState(state.step + 1, params, opt_state, ema, state.rng)
    return new_state, {'loss': jax.lax.pmean(loss, parallel.AXIS)}

  return train_step


def test_sam_off_is_bit_identical_and_traces_one_pass():
  model = MLP(drop=True)
  config = step_config(rho=0.0)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = initial_state(model.init(), optimizer)
  batch = make_batch(2, 8, 4)
  got, metrics = run_step(model, optimizer, schedule, config, state, batch)
  devices = jax.local_devices()[:2]
  ref = parallel.map_train_step(reference_step(model, optimizer, schedule, config), devices)
  want, want_metrics = jax.device_get(ref(parallel.replicate(state, devices), batch))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  np.testing.assert_array_equal(metrics['loss'], want_metrics['loss'])
  # One forward pass per step is traced with SAM off, two with it on.
  for rho, passes in ((0.0, 1), (0.05, 2)):
    model = MLP()
    train_step = steps.make_train_step(model, optimizer, schedule, step_config(rho), NUM_CLASSES)
    jax.make_jaxpr(train_step, axis_env=[(parallel.AXIS, 1)])(
      state, jax.tree.map(lambda x: x[0], batch)
    )
    assert model.traces == passes


# ---------------------------------------------------------------------------
# Configs: validation, resuming old workdirs, the F5/F6 experiments.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
  'field,value,match',
  [
    ('sam_rho', -0.05, r'--config.optimizer.sam_rho must be >= 0 .*got -0.05'),
    ('sam_ascent_fraction', 0.0, r'--config.optimizer.sam_ascent_fraction must be in \(0, 1\]'),
    ('sam_ascent_fraction', 1.2, r'sam_ascent_fraction must be in \(0, 1\], got 1.2'),
  ],
)
def test_validate_config_refuses_bad_sam_settings(field, value, match):
  config = digits_config.get_config()
  config.optimizer[field] = value
  with pytest.raises(ValueError, match=match) as e:
    train.validate_config(config)
  assert '\n' not in str(e.value)
  config = step_config(rho=0.05, fraction=1.0, accum_steps=2)  # SAM with accumulation is fine
  train.validate_config(config)


def test_workdir_from_before_sam_resumes_and_turning_sam_on_is_a_change(tmp_path):
  config = digits_config.get_config()
  stored = train.config_to_dict(config)
  for field in ('sam_rho', 'sam_ascent_fraction'):
    del stored['optimizer'][field]
  (tmp_path / train.CONFIG_FILE).write_text(json.dumps(stored))
  assert train.check_resumed_config(config, str(tmp_path)) == []
  config.optimizer.sam_rho = 0.05
  with pytest.raises(ValueError, match=r'optimizer.sam_rho: 0.0 -> 0.05'):
    train.check_resumed_config(config, str(tmp_path))


def test_f6_trains_with_sam_and_f5_on_request():
  f5, f5_sam, f6 = (nfnet_config.get_config(arg) for arg in ('F5', 'F5+SAM', 'F6'))
  assert f5.optimizer.sam_rho == 0.0
  for config in (f5_sam, f6):
    assert config.optimizer.sam_rho == nfnet_config.SAM_RHO > 0
    assert config.optimizer.sam_ascent_fraction == 0.2  # arXiv 2102.06171 appendix A.4
    train.validate_config(config)
  assert f5_sam.model.kwargs.variant == 'F5' and f6.model.kwargs.variant == 'F6'
  # Apart from SAM, F5+SAM is F5.
  f5_sam.optimizer.sam_rho = 0.0
  assert train.config_changes(train.config_to_dict(f5), f5_sam) == []
