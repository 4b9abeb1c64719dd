"""Knowledge distillation (Hinton et al. 2015, arXiv 1503.02531; "Bag of Tricks", arXiv
1812.01187 section 5.4): the loss against NumPy, the train step against a per-device hand
computation (with SAM and gradient accumulation), the teacher's evaluation mode, missing
gradient and place in the compiled program, the loading errors, and a run end to end."""

import os

import haiku as hk
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import digits as digits_config
from nfnet_jax import data, distill, losses, optim, parallel, steps, train, weights

NUM_CLASSES = 10
SIZE = 16


# ---------------------------------------------------------------------------
# The loss, against NumPy in float64.
# ---------------------------------------------------------------------------
def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_distill_loss(s, t, targets, weight, temperature, smoothing):
  """(1 - a) CE(smoothed labels, s) + a T^2 CE(softmax(t / T), s / T), per example."""
  c = s.shape[-1]
  targets = np.asarray(targets, np.float64) * (1 - smoothing) + smoothing / c
  hard = -(targets * np_log_softmax(s)).sum(-1)
  p_t = np.exp(np_log_softmax(np.asarray(t, np.float64) / temperature))
  soft = -(p_t * np_log_softmax(np.asarray(s, np.float64) / temperature)).sum(-1)
  return (1 - weight) * hard + weight * temperature**2 * soft


_distill_loss = jax.jit(losses.distillation_cross_entropy, static_argnums=(3,))


@settings(max_examples=25, deadline=None)
@given(
  weight=st.floats(0.0, 1.0),
  temperature=st.floats(0.05, 30.0),
  smoothing=st.sampled_from([0.0, 0.1]),
  hard_labels=st.booleans(),
  seed=st.integers(0, 2**31 - 1),
)
def test_loss_matches_numpy(weight, temperature, smoothing, hard_labels, seed):
  rng = np.random.default_rng(seed)
  s = rng.normal(0, 3, (6, NUM_CLASSES)).astype(np.float32)
  t = rng.normal(0, 3, (6, NUM_CLASSES)).astype(np.float32)
  if hard_labels:
    labels = rng.integers(0, NUM_CLASSES, 6).astype(np.int32)
    targets = np.eye(NUM_CLASSES)[labels]
  else:  # MixUp/CutMix soft labels: two classes per example
    a, b = rng.integers(0, NUM_CLASSES, (2, 6))
    lam = rng.uniform(0, 1, (6, 1))
    labels = targets = (lam * np.eye(NUM_CLASSES)[a] + (1 - lam) * np.eye(NUM_CLASSES)[b]).astype(
      np.float32
    )
  got = _distill_loss(s, t, labels, NUM_CLASSES, weight, temperature, smoothing)
  assert got.dtype == jnp.float32 and got.shape == (6,)
  want = np_distill_loss(s, t, targets, weight, temperature, smoothing)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, temperature**2))


def test_loss_endpoints():
  rng = np.random.default_rng(0)
  s, t = rng.normal(0, 2, (2, 4, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, 4)
  # weight 0: the label loss alone; weight 1 at T = 1: cross-entropy against the teacher.
  np.testing.assert_allclose(
    losses.distillation_cross_entropy(s, t, labels, NUM_CLASSES, 0.0, 3.0, 0.1),
    losses.softmax_cross_entropy(s, labels, NUM_CLASSES, 0.1),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    losses.distillation_cross_entropy(s, t, labels, NUM_CLASSES, 1.0, 1.0, 0.1),
    -(np.exp(np_log_softmax(t)) * np_log_softmax(s)).sum(-1),
    rtol=1e-5,
  )
  with pytest.raises(ValueError, match='teacher logits have 3 classes'):
    losses.distillation_cross_entropy(s, t[:, :3], labels, NUM_CLASSES, 0.5, 1.0)


# ---------------------------------------------------------------------------
# The train step, against a per-device hand computation.
# ---------------------------------------------------------------------------
def tiny_net(width, drop_rate=0.0, hidden=0, trace_log=None):
  """conv -> ReLU -> mean -> [dropout] -> [hidden linear] -> linear, named like a model
  (AGC leaves the classifier `linear/w` alone). `trace_log` counts its traces."""

  def forward(images, is_training, return_metrics=False):
    del return_metrics
    if trace_log is not None:
      trace_log.append(width)
    x = hk.Conv2D(width, 3, stride=2, name='conv')(images)
    x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
    if hidden:
      x = jax.nn.relu(hk.Linear(hidden, name='hidden')(x))
    if is_training and drop_rate:
      x = hk.dropout(hk.next_rng_key(), drop_rate, x)
    return {'logits': hk.Linear(NUM_CLASSES, name='linear')(x)}

  return hk.transform(forward)


def step_config(weight=0.6, temperature=2.5, rho=0.0, accum_steps=1):
  config = digits_config.get_config()
  config.dtype = 'float32'
  config.optimizer.update(warmup_epochs=0.0, sam_rho=rho, sam_ascent_fraction=0.5)
  config.train.grad_accum_steps = accum_steps
  config.distill.update(teacher='unused-by-the-step.npz', weight=weight, temperature=temperature)
  return config


def make_problem(num_devices, per_device, seed=0):
  student, teacher = tiny_net(8), tiny_net(16, drop_rate=0.5, hidden=32)
  x = jnp.zeros((1, SIZE, SIZE, 3))
  params = student.init(jax.random.PRNGKey(seed), x, True)
  teacher_params = teacher.init(jax.random.PRNGKey(seed + 1), x, True)
  # A teacher that is confident: its logits then pull the student visibly.
  teacher_params = jax.tree.map(lambda p: 3 * p, teacher_params)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_devices, per_device, SIZE, SIZE, 3), np.uint8)
  a, b = rng.integers(0, NUM_CLASSES, (2, num_devices, per_device))
  lam = rng.uniform(0.2, 0.8, (num_devices, per_device, 1))
  labels = (lam * np.eye(NUM_CLASSES)[a] + (1 - lam) * np.eye(NUM_CLASSES)[b]).astype(np.float32)
  return student, teacher, params, teacher_params, {'images': images, 'labels': labels}


def initial_state(params, optimizer):
  return jax.device_get(
    steps.TrainState(
      step=jnp.asarray(2, jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree.map(lambda p: 0.9 * p, params),
      rng=jax.random.PRNGKey(7),
    )
  )


def hand_step(config, student, teacher, optimizer, state, teacher_params, batch):
  """The distillation step written out: per device d, the eval-mode teacher's logits of
  its images, the loss by hand (log-softmax written out), SAM's ascent on its first
  examples when rho > 0, the gradient; the mean over devices, the optimizer, the EMA."""
  weight, temperature = config.distill.weight, config.distill.temperature
  rho, fraction = config.optimizer.sam_rho, config.optimizer.sam_ascent_fraction
  ls = config.label_smoothing
  mean, std = np.asarray(data.MEAN_RGB, np.float32), np.asarray(data.STDDEV_RGB, np.float32)

  def log_softmax(z):
    return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)

  def loss(p, images, labels, teacher_logits):
    s = student.apply(p, None, images, True)['logits']
    smoothed = labels * (1 - ls) + ls / NUM_CLASSES
    hard = -jnp.sum(smoothed * log_softmax(s), -1)
    p_t = jnp.exp(log_softmax(teacher_logits / temperature))
    soft = -jnp.sum(p_t * log_softmax(s / temperature), -1)
    return jnp.mean((1 - weight) * hard + weight * temperature**2 * soft)

  grad = jax.jit(jax.grad(loss))
  teacher_apply = jax.jit(lambda p, x: teacher.apply(p, None, x, False)['logits'])
  grads = []
  for d in range(batch['images'].shape[0]):
    images = (batch['images'][d].astype(np.float32) - mean) / std
    labels, t = batch['labels'][d], np.asarray(teacher_apply(teacher_params, images))
    params = state.params
    if rho:
      m = max(1, int(fraction * len(labels)))
      g = grad(params, images[:m], labels[:m], t[:m])
      norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(g)))
      params = jax.tree.map(lambda p, x, scale=rho / norm: p + scale * x, params, g)
    grads.append(jax.device_get(grad(params, images, labels, t)))
  mean_grads = jax.tree.map(lambda *g: np.mean(g, axis=0), *grads)
  updates, opt_state = optimizer.update(mean_grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema_params, new_params, state.step, config.ema_max_decay)
  return jax.device_get((new_params, opt_state, ema))


@pytest.mark.parametrize(
  'num_devices,accum_steps,rho,mode',
  [(1, 1, 0.0, 'shard_map'), (2, 2, 0.0, 'pmap'), (2, 1, 0.1, 'shard_map')],
)
def test_step_with_a_teacher_equals_a_hand_computation(num_devices, accum_steps, rho, mode):
  config = step_config(rho=rho, accum_steps=accum_steps)
  student, teacher, params, teacher_params, batch = make_problem(num_devices, 4)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  state = initial_state(params, optimizer)
  devices = jax.local_devices()[:num_devices]
  step = distill.map_train_step(
    steps.make_train_step(student, optimizer, schedule, config, NUM_CLASSES, teacher),
    devices,
    teacher_params,
    mode=mode,
  )
  new_state, metrics = jax.device_get(step(parallel.replicate(state, devices), batch))
  want_params, want_opt_state, want_ema = hand_step(
    config, student, teacher, optimizer, state, teacher_params, batch
  )
  moved = max(
    jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), want_params, params))
  )
  assert moved > 1e-3
  for got, want in ((new_state.params, want_params), (new_state.ema_params, want_ema)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, want)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
    new_state.opt_state,
    want_opt_state,
  )
  assert np.isfinite(metrics['loss'])
  # Without the teacher term the step goes elsewhere: the test sees the teacher.
  plain = config.copy_and_resolve_references()
  plain.distill.weight = 0.0
  plain_step = distill.map_train_step(
    steps.make_train_step(student, optimizer, schedule, plain, NUM_CLASSES, teacher),
    devices,
    teacher_params,
    mode=mode,
  )
  other, _ = jax.device_get(plain_step(parallel.replicate(state, devices), batch))
  gap = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), other.params, want_params)
  assert max(jax.tree.leaves(gap)) > 1e-4


def test_teacher_runs_in_eval_mode_without_gradient():
  _, teacher, _, teacher_params, batch = make_problem(1, 8)
  images = steps.model_inputs(jnp.asarray(batch['images'][0]))
  logits = distill.teacher_logits(teacher, teacher_params, images)
  # Dropout (rate 0.5) is off: the eval-mode output, not a training-mode draw.
  np.testing.assert_array_equal(
    logits, teacher.apply(teacher_params, None, images, False)['logits']
  )
  trained = teacher.apply(teacher_params, jax.random.PRNGKey(0), images, True)['logits']
  assert np.max(np.abs(np.asarray(trained) - np.asarray(logits))) > 1e-3
  grads = jax.grad(lambda p: jnp.sum(distill.teacher_logits(teacher, p, images) ** 2))(
    teacher_params
  )
  assert all(not np.any(g) for g in jax.tree.leaves(grads))
  # And the student's loss gives the teacher nothing either.
  student = tiny_net(8)
  params = student.init(jax.random.PRNGKey(0), images, True)

  def loss(params, teacher_params):
    t = distill.teacher_logits(teacher, teacher_params, images)
    s = student.apply(params, None, images, True)['logits']
    return jnp.mean(
      losses.distillation_cross_entropy(s, t, batch['labels'][0], NUM_CLASSES, 0.5, 2.0)
    )

  g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(params, teacher_params)
  assert all(not np.any(g) for g in jax.tree.leaves(g_teacher))
  assert any(np.any(g) for g in jax.tree.leaves(g_student))


def test_teacher_params_are_an_argument_not_constants():
  """The lowered program takes every teacher array as an input, and its text does not
  grow with the teacher's size (constants would be written into it)."""
  config = step_config()
  student = tiny_net(8)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  _, _, params, _, batch = make_problem(1, 4)
  state = initial_state(params, optimizer)
  devices = jax.local_devices()[:1]
  texts, sizes = [], []
  for hidden in (16, 512):
    teacher = tiny_net(hidden, hidden=hidden)
    teacher_params = teacher.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZE, SIZE, 3)), False)
    step = distill.map_train_step(
      steps.make_train_step(student, optimizer, schedule, config, NUM_CLASSES, teacher),
      devices,
      teacher_params,
    )
    lowered = step.mapped.lower(parallel.replicate(state, devices), batch, step.teacher_params)
    args = jax.tree.leaves(lowered.args_info[0][2])
    assert len(args) == len(jax.tree.leaves(teacher_params))
    texts.append(len(lowered.as_text()))
    sizes.append(sum(x.nbytes for x in jax.tree.leaves(teacher_params)))
  assert sizes[1] - sizes[0] > 1_000_000  # 16 -> 512 channels: > 1 MB more weights
  assert abs(texts[1] - texts[0]) < 2_000  # the program: the same up to its shapes


def test_without_a_teacher_nothing_of_it_is_traced_and_the_step_is_plain():
  """distill off: the step is the cross-entropy step, bit for bit, and no teacher is
  traced (the per-device hand computation below is the step as it was before)."""
  config = step_config()
  config.distill.teacher = ''
  student = tiny_net(8)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  _, _, params, _, batch = make_problem(1, 4)
  state = initial_state(params, optimizer)
  devices = jax.local_devices()[:1]
  traced = []
  off = steps.make_train_step(student, optimizer, schedule, config, NUM_CLASSES)
  step = parallel.map_train_step(off, devices)
  new_state, _ = jax.device_get(step(parallel.replicate(state, devices), batch))
  # The same step from a config that predates `distill` (no such section at all).
  bare = config.copy_and_resolve_references()
  del bare['distill']
  step = parallel.map_train_step(
    steps.make_train_step(tiny_net(8, trace_log=traced), optimizer, schedule, bare, NUM_CLASSES),
    devices,
  )
  again, _ = jax.device_get(step(parallel.replicate(state, devices), batch))
  jax.tree.map(np.testing.assert_array_equal, again, new_state)
  assert traced == [8]  # the student alone, traced once
  # And it is the plain cross-entropy step.
  mean, std = np.asarray(data.MEAN_RGB, np.float32), np.asarray(data.STDDEV_RGB, np.float32)
  images = (batch['images'][0].astype(np.float32) - mean) / std

  def loss(p):
    s = student.apply(p, None, images, True)['logits']
    return jnp.mean(
      losses.softmax_cross_entropy(s, batch['labels'][0], NUM_CLASSES, config.label_smoothing)
    )

  grads = jax.grad(loss)(state.params)
  updates, _ = optimizer.update(grads, state.opt_state, state.params)
  want = optax.apply_updates(state.params, updates)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, want
  )


# ---------------------------------------------------------------------------
# Loading the teacher, and the errors.
# ---------------------------------------------------------------------------
def export_tiny_f0(path, num_classes=NUM_CLASSES, width=0.0625, group_size=8):
  """A narrow F0's parameters (random, of the model's shapes) as a run's params_ema.npz
  holds them."""
  config = digits_config.get_config()
  config.model.kwargs.update(width=width, group_size=group_size)
  shapes = weights.expected_param_shapes('F0', num_classes, width=width, group_size=group_size)
  rng = np.random.default_rng(3)
  params = {
    m: {n: rng.normal(0, 0.1, shape).astype(np.float32) for n, shape in group.items()}
    for m, group in shapes.items()
  }
  os.makedirs(path, exist_ok=True)
  return weights.export_params(config.model, params, str(path)), params


def test_teacher_loads_its_variant_and_width_from_the_file(tmp_path):
  path, params = export_tiny_f0(tmp_path)
  teacher = distill.load_teacher(path, NUM_CLASSES, 'float32')
  assert teacher.name == 'F0' and teacher.num_classes == NUM_CLASSES
  assert teacher.model_config.kwargs.width == 0.0625
  assert teacher.model_config.kwargs.group_size == 8
  jax.tree.map(np.testing.assert_array_equal, teacher.params, params)
  # The model it builds takes those parameters.
  logits = jax.eval_shape(
    lambda p, x: distill.teacher_logits(teacher.model, p, x),
    teacher.params,
    jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32),
  )
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32


def test_missing_teacher_and_class_mismatch_are_one_line_errors(tmp_path):
  missing = str(tmp_path / 'nowhere.npz')
  with pytest.raises(FileNotFoundError, match='distill.teacher=.*nowhere.npz does not exist') as e:
    distill.load_teacher(missing, NUM_CLASSES, 'float32')
  assert '\n' not in str(e.value)
  path, _ = export_tiny_f0(tmp_path / 'three', num_classes=3)
  with pytest.raises(ValueError, match='F0 with 3 classes but the student') as e:
    distill.load_teacher(path, NUM_CLASSES, 'float32', 'the student (F0 on digits)')
  assert '10' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize(
  'field,value,match',
  [('weight', 1.5, r'weight must be in \[0, 1\]'), ('temperature', 0.0, 'temperature must be > 0')],
)
def test_bad_distill_values_are_refused(field, value, match):
  config = digits_config.get_config()
  config.distill[field] = value
  with pytest.raises(ValueError, match=match) as e:
    train.validate_config(config)
  assert '\n' not in str(e.value)


def test_distill_fields_define_the_run():
  assert 'distill' in train.RUN_DEFINING_FIELDS
  assert train._defines_run('distill.temperature') and train._defines_run('distill.teacher')


# ---------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_train_and_evaluate_with_a_teacher(tmp_path):
  """A narrow F0 learns from an exported F0 of another width; the teacher is no part of
  the checkpoint, a resumed run needs its file, and changing distill is refused."""
  teacher_path, _ = export_tiny_f0(tmp_path / 'teacher', width=0.125)
  config = digits_config.get_config()
  config.model.kwargs.update(width=0.0625, group_size=8, stochdepth_rate=0.0, drop_rate=0.0)
  config.data.image_size = SIZE
  config.train.update(batch_size=16, num_steps=2, log_every_steps=1, eval_every_steps=1000)
  config.eval.batch_size = 120
  config.checkpoint.every_steps = 2
  config.distill.update(teacher=teacher_path, weight=0.7, temperature=2.0)
  workdir = str(tmp_path / 'student')
  results = train.train_and_evaluate(config, workdir, progress_bar=False)
  assert results['eval_count'] == 360 and np.isfinite(results['eval_loss'])
  ckpt_files = [f for _, _, fs in os.walk(os.path.join(workdir, 'checkpoints')) for f in fs]
  assert ckpt_files and 'teacher' not in ' '.join(ckpt_files)
  changed = config.copy_and_resolve_references()
  changed.distill.weight = 0.2
  with pytest.raises(ValueError, match='distill.weight: 0.7 -> 0.2'):
    train.train_and_evaluate(changed, workdir, progress_bar=False)
  os.remove(teacher_path)
  with pytest.raises(FileNotFoundError, match='distill.teacher'):
    train.train_and_evaluate(config, workdir, progress_bar=False)
