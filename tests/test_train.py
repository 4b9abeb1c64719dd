"""The data-parallel train/eval steps and the training loop (8 simulated CPU devices)."""

import json
import os
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from experiments import digits as digits_config
from experiments import finetune as finetune_config
from experiments import nf_regnet as nf_regnet_config
from experiments import nf_resnet as nf_resnet_config
from experiments import nfnet as nfnet_config
from nfnet_jax import checkpoint as checkpoint_lib
from nfnet_jax import data, models, parallel, steps, train, weights
from nfnet_jax import metrics as metrics_lib
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN = 1_281_167  # images in ILSVRC-2012's training set


def tiny_config(**train_overrides):
  config = digits_config.get_config()
  config.model.kwargs.update(width=0.0625, group_size=8, stochdepth_rate=0.0, drop_rate=0.0)
  config.data.image_size = 16
  config.train.update(batch_size=16, num_steps=4, log_every_steps=1, eval_every_steps=1000)
  config.train.update(**train_overrides)
  config.eval.batch_size = 56  # 360 test digits = 6 x 56 + 24: padding
  config.checkpoint.every_steps = 2
  return config


def _model_and_steps(config, num_classes=10):
  model = models.build_model(config.model, num_classes, config.dtype)
  optimizer, schedule = train.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  return model, optimizer, schedule


def test_devices_are_simulated():
  assert jax.local_device_count() == 8, 'tests/conftest.py should give 8 CPU devices'


def test_data_parallel_step_equals_single_device_step():
  """8 devices x 2 images == 1 device x 16 images: the property the design rests on."""
  config = tiny_config()
  config.optimizer.warmup_epochs = 0.0  # a non-zero learning rate at the first step
  model, optimizer, schedule = _model_and_steps(config)
  state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, 16)
  # Non-zero skip gains, so that every parameter gets a gradient.
  state = state._replace(
    params=jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.5 if 'skip_gain' in str(path) else p, state.params
    )
  )
  assert float(schedule(0)) > 0
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=(16,)).astype(np.int32)
  step_fn = steps.make_train_step(model, optimizer, schedule, config, 10)

  copy = lambda tree: jax.tree.map(jnp.array, tree)  # the steps donate their input
  eight = parallel.map_train_step(step_fn, jax.local_devices()[:8])
  state8, metrics8 = eight(
    copy(state), {'images': images.reshape(8, 2, 16, 16, 3), 'labels': labels.reshape(8, 2)}
  )
  one = parallel.map_train_step(step_fn, jax.local_devices()[:1])
  state1, metrics1 = one(copy(state), {'images': images[None], 'labels': labels[None]})

  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state1.params, state.params)
  assert max(jax.tree.leaves(moved)) > 1e-4, 'the step should change the params'
  for name in ('params', 'ema_params', 'opt_state'):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      getattr(state8, name),
      getattr(state1, name),
    )
  for key in ('loss', 'top1', 'grad_norm', 'param_norm', 'agc_clip_fraction'):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5)
  assert int(state8.step) == 1


def test_eval_counts_every_example_once_and_matches_direct_computation():
  config = tiny_config()
  model, optimizer, _ = _model_and_steps(config)
  state = steps.init_state(jax.random.PRNGKey(1), model, optimizer, 16)
  # A trained-looking classifier so that top-1 is not trivially 10%.
  params = jax.tree.map(lambda p: p, state.params)
  params['NFNet/~/linear']['w'] = jax.random.normal(
    jax.random.PRNGKey(2), params['NFNet/~/linear']['w'].shape
  )
  params['NFNet/~/nf_block_3']['skip_gain'] = jnp.asarray(1.0)
  state = state._replace(params=params, ema_params=jax.tree.map(lambda p: p * 0.5, params))
  p_eval = parallel.map_eval_step(steps.make_eval_step(model, 10), jax.local_devices())
  results = train.evaluate_split(p_eval, state, config, 'test', jax.local_devices())

  # Independent: the whole split in one batch through model.apply, no padding.
  batches = list(
    data.eval_iterator(config.data, split='test', per_device_batch=360, local_devices=1)
  )
  assert len(batches) == 1 and batches[0]['mask'].sum() == 360
  images, labels = batches[0]['images'][0], batches[0]['labels'][0]
  for prefix, params in (('', state.params), ('ema_', state.ema_params)):
    logits = np.asarray(model.apply(params, None, images, is_training=False)['logits'], np.float64)
    order = np.argsort(-logits, axis=-1)
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([label in row[:5] for row, label in zip(order, labels)])
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(360), labels])
    # The batched (padded, 8-device) and this unbatched forward differ by float
    # rounding, which can flip a near-tie: allow exactly those examples to differ.
    sorted_logits = np.take_along_axis(logits, order, -1)
    near_ties_1 = np.sum(sorted_logits[:, 0] - sorted_logits[:, 1] < 1e-4)
    near_ties_5 = np.sum(sorted_logits[:, 4] - sorted_logits[:, 5] < 1e-4)
    assert abs(results[f'eval_{prefix}top1'] - top1) <= near_ties_1 / 360 + 1e-9
    assert abs(results[f'eval_{prefix}top5'] - top5) <= near_ties_5 / 360 + 1e-9
    assert results[f'eval_{prefix}loss'] == pytest.approx(loss, rel=1e-4)
  assert results['eval_count'] == 360


def test_mixed_precision_computes_in_bfloat16_with_float32_params():
  config = tiny_config()
  config.dtype = 'bfloat16'
  model, optimizer, schedule = _model_and_steps(config)
  state = steps.init_state(jax.random.PRNGKey(0), model, optimizer, 16)
  dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  images = jnp.ones((2, 16, 16, 3), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, None, images, False))(state.params))
  assert 'conv_general_dilated' in jaxpr or 'dot_general' in jaxpr
  assert 'bf16' in jaxpr
  out = model.apply(state.params, None, images, False)
  assert out['logits'].dtype == jnp.float32
  step = parallel.map_train_step(
    steps.make_train_step(model, optimizer, schedule, config, 10), jax.local_devices()[:2]
  )
  new_state, metrics = step(
    state, {'images': np.ones((2, 1, 16, 16, 3), np.float32), 'labels': np.zeros((2, 1), np.int32)}
  )
  assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(new_state.opt_state)} <= {
    jnp.dtype(jnp.float32),
    jnp.dtype(jnp.int32),
  }
  assert np.isfinite(metrics['loss'])


@pytest.mark.slow
def test_train_resumes_and_refuses_a_different_model(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_steps=4)
  first = train.train_and_evaluate(config, workdir, progress_bar=False)
  assert first['eval_count'] == 360
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4']

  # A longer run changes the schedule: refused unless asked for, and then continued.
  config = tiny_config(num_steps=6)
  with pytest.raises(ValueError, match='train.num_steps: 4 -> 6'):
    train.train_and_evaluate(config, workdir, progress_bar=False)
  train.train_and_evaluate(config, workdir, progress_bar=False, allow_config_change=True)
  records = metrics_lib.read_metrics(workdir)
  train_steps = [r['step'] for r in records if 'loss' in r]
  assert train_steps == [1, 2, 3, 4, 5, 6], 'steps 1-4 once, then resumed at 5'
  assert sum('num_params' in r for r in records) == 1

  before = {
    name: open(os.path.join(workdir, name), 'rb').read()
    for name in ('metrics.jsonl', 'model_signature.json')
  }
  listing = sorted(os.listdir(ckpt_dir))
  other = tiny_config(num_steps=8)
  other.model.kwargs.width = 0.125
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match='width'):
    train.train_and_evaluate(other, workdir, progress_bar=False)
  assert sorted(os.listdir(ckpt_dir)) == listing
  for name, content in before.items():
    assert open(os.path.join(workdir, name), 'rb').read() == content

  evaluated = train.evaluate(tiny_config(num_steps=6), workdir)
  assert evaluated['eval_count'] == 360
  assert metrics_lib.read_metrics(workdir)[-1]['step'] == 6


def test_eval_mode_without_checkpoint_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match='Train first'):
    train.evaluate(tiny_config(), str(tmp_path / 'empty'))


def test_divergence_stops_training_and_keeps_a_finite_checkpoint(tmp_path):
  workdir = str(tmp_path / 'diverge')
  config = tiny_config(num_steps=12)
  config.optimizer.update(base_lr=1e12, clipping=0.0, warmup_epochs=0.0)
  config.checkpoint.every_steps = 1
  with pytest.raises(train.NonFiniteLossError, match='diverged at step') as error:
    train.train_and_evaluate(config, workdir, progress_bar=False)
  assert 'last good checkpoint' in str(error.value)
  records = metrics_lib.read_metrics(workdir)
  last_logged = records[-1]['step']  # the last step whose metrics were finite
  assert last_logged < 12
  ckpt = checkpoint_lib.Checkpointer(
    workdir, model_signature=models.model_signature(config.model, 10)
  )
  saved = ckpt.latest_step()
  assert saved is not None and saved <= last_logged
  model, optimizer, _ = _model_and_steps(config)
  state = train.restore(ckpt, steps.init_state(jax.random.PRNGKey(0), model, optimizer, 16))
  ckpt.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_global_batch_must_divide_over_devices():
  with pytest.raises(ValueError, match='multiple of 8'):
    parallel.per_device_batch_size(12, 8)


def _parse_config_flags(argv):
  values = flags.FlagValues()
  # config_flags finds the --config.x overrides in sys_argv (sys.argv by default).
  config_flags.DEFINE_config_file(
    'config', None, 'test', flag_values=values, lock_config=True, sys_argv=['prog'] + argv
  )
  values(['prog'] + argv)
  return values.config


def test_config_overrides_and_typos():
  path = os.path.join(REPO, 'experiments', 'digits.py')
  config = _parse_config_flags(
    [f'--config={path}', '--config.train.batch_size=32', '--config.model.kwargs.width=0.25']
  )
  assert config.train.batch_size == 32 and config.model.kwargs.width == 0.25
  with pytest.raises(Exception, match='batch_sise'):
    _parse_config_flags([f'--config={path}', '--config.train.batch_sise=32'])
  nfnet_path = os.path.join(REPO, 'experiments', 'nfnet.py')
  config = _parse_config_flags([f'--config={nfnet_path}:F1'])
  assert config.model.kwargs.variant == 'F1'


@pytest.mark.parametrize('variant', ['F0', 'F1', 'F3', 'F5', 'F7', 'F0+', 'F6+'])
def test_nfnet_configs_reproduce_the_published_recipe(variant):
  config = nfnet_config.get_config(variant)
  train.validate_config(config)
  expected = helpers.NFNET_SIZES[variant.rstrip('+')]  # "+" variants: the same sizes
  assert (
    config.data.image_size,
    config.data.eval_image_size,
    config.data.randaug_magnitude,
    config.model.kwargs.drop_rate,
  ) == expected
  assert config.data.randaug_layers == 4
  assert config.train.batch_size == 4096
  assert train.total_train_steps(config, IMAGENET_TRAIN) == 112_602
  assert config.model.kwargs.stochdepth_rate == 0.25
  assert config.label_smoothing == 0.1 and config.ema_max_decay == 0.99999
  opt = config.optimizer
  assert (opt.momentum, opt.nesterov, opt.weight_decay, opt.clipping, opt.eps) == (
    0.9,
    True,
    2e-5,
    0.01,
    1e-3,
  )
  _, schedule = train.make_optimizer(config, 112_602, 1_281_167 / 4096)
  warmup = round(5 * 1_281_167 / 4096)
  assert float(schedule(warmup)) == pytest.approx(1.6)
  assert float(schedule(112_602)) == pytest.approx(0.0, abs=1e-9)
  assert config.dtype == 'bfloat16'


# The released NF-RegNet experiment (deepmind-research/nfnets/experiment_nf_regnets.py),
# typed from it: weight decay B0..B5, then its stated rule 5e-5 + 1e-5 x level.
RELEASED_NF_REGNET_WD = {
  'B0': 5e-5,
  'B1': 6e-5,
  'B2': 7e-5,
  'B3': 8e-5,
  'B4': 9e-5,
  'B5': 1e-4,
  'B6': 1.1e-4,
  'B7': 1.2e-4,
  'B8': 1.3e-4,
}


@pytest.mark.parametrize('variant', sorted(RELEASED_NF_REGNET_WD))
def test_nf_regnet_configs_carry_the_released_recipe(variant):
  config = nf_regnet_config.get_config(variant)
  train.validate_config(config)
  assert (config.data.image_size, config.data.eval_image_size) == helpers.NF_REGNET_SIZES[variant]
  assert config.model.kwargs.drop_rate == helpers.NF_REGNET_DROPOUT[variant]
  assert config.model.name == 'NFRegNet'
  kw = config.model.kwargs
  assert (
    kw.width,
    kw.expansion,
    kw.group_size,
    kw.se_ratio,
    kw.alpha,
    kw.stochdepth_rate,
    kw.activation,
  ) == (0.75, 2.25, 8, 0.5, 0.2, 0.1, 'silu')
  assert config.train.batch_size == 1024
  steps = train.total_train_steps(config, IMAGENET_TRAIN)
  assert steps == 1_281_167 * 360 // 1024 == 450_410
  opt = config.optimizer
  assert opt.weight_decay == pytest.approx(RELEASED_NF_REGNET_WD[variant], rel=1e-9)
  assert (opt.momentum, opt.nesterov, opt.clipping) == (0.9, True, 0.0)  # no AGC
  _, schedule = train.make_optimizer(config, steps, 1_281_167 / 1024)
  warmup = round(5 * 1_281_167 / 1024)
  assert float(schedule(warmup)) == pytest.approx(0.4)  # not scaled by the batch
  assert float(schedule(steps)) == pytest.approx(0.001)
  assert (config.data.mixup_alpha, config.data.cutmix, config.data.randaug_layers) == (0.2, True, 0)
  assert config.data.eval_preprocess == 'crop_resize'
  assert config.label_smoothing == 0.1 and config.ema_max_decay == 0.99999
  assert config.dtype == 'float32'
  model = models.build_model(config.model, 1000, config.dtype)  # defaults build
  shapes = jax.eval_shape(
    lambda r, x: model.init(r, x, is_training=True),
    jax.random.PRNGKey(0),
    jnp.zeros((1, 64, 64, 3)),
  )
  assert models.count_params(shapes) > 0


@pytest.mark.parametrize(
  'variant', ['ResNet50', 'ResNet101', 'ResNet152', 'ResNet200', 'ResNet288', 'ResNet600']
)
def test_nf_resnet_configs_carry_the_released_resnet_recipe(variant):
  config = nf_resnet_config.get_config(variant)
  train.validate_config(config)
  assert config.model.name == 'NFResNet' and config.model.kwargs.variant == variant
  assert (config.data.image_size, config.data.eval_image_size) == (224, 224)
  steps = train.total_train_steps(config, IMAGENET_TRAIN)
  assert steps == 1_281_167 * 90 // 1024 == 112_602
  opt = config.optimizer
  assert (opt.weight_decay, opt.clipping, opt.momentum, opt.nesterov) == (1e-4, 0.0, 0.9, True)
  _, schedule = train.make_optimizer(config, steps, 1_281_167 / 1024)
  assert float(schedule(round(5 * 1_281_167 / 1024))) == pytest.approx(0.1 * 1024 / 256)
  assert float(schedule(steps)) == pytest.approx(0.0, abs=1e-9)
  assert (config.data.mixup_alpha, config.data.cutmix, config.data.randaug_layers) == (
    0.0,
    False,
    0,
  )
  kw = config.model.kwargs
  assert (kw.width, kw.alpha, kw.stochdepth_rate, kw.drop_rate, kw.use_se) == (
    4,
    0.2,
    0.1,
    0.0,
    False,
  )
  model = models.build_model(config.model, 1000, config.dtype)
  shapes = jax.eval_shape(
    lambda r, x: model.init(r, x, is_training=True),
    jax.random.PRNGKey(0),
    jnp.zeros((1, 64, 64, 3)),
  )
  assert models.count_params(shapes) > 0


@pytest.mark.parametrize('module', [nf_regnet_config, nf_resnet_config])
def test_family_digits_configs_keep_the_recipe_on_the_embedded_data(module):
  config = module.get_config('digits')
  train.validate_config(config)
  full = module.get_config(None)
  assert config.data.name == 'digits' and config.eval.splits == 'test'
  assert config.model.name == full.model.name
  assert config.optimizer.clipping == 0.0 == full.optimizer.clipping
  assert config.optimizer.weight_decay == full.optimizer.weight_decay
  # The learning rate follows the batch: peak x 64 / 1024.
  _, schedule = train.make_optimizer(config, 898, 22.45)
  _, full_schedule = train.make_optimizer(full, 10_000, 1251.1)
  assert float(schedule(round(5 * 22.45))) == pytest.approx(
    float(full_schedule(round(5 * 1251.1))) * 64 / 1024
  )


def test_variant_of_another_family_is_refused_before_anything_runs(tmp_path):
  config = nf_regnet_config.get_config('B0')
  config.model.kwargs.variant = 'F0'
  with pytest.raises(ValueError, match="'F0' is an NFNet variant but model.name is 'NFRegNet'"):
    train.validate_config(config)
  with pytest.raises(ValueError, match='NF-RegNet-B0, NF-RegNet-B1'):
    nf_regnet_config.get_config('B9')
  with pytest.raises(ValueError, match='NF-ResNet50, NF-ResNet101'):
    nf_resnet_config.get_config('ResNet18')


def test_unknown_variant_in_config_lists_valid_ones():
  with pytest.raises(ValueError, match='F0, F0\\+, F1'):
    nfnet_config.get_config('F8')
  with pytest.raises(ValueError, match='F0, F0\\+, F1'):
    finetune_config.get_config('F8')


@pytest.mark.parametrize('arg', ['F0', 'F3', 'digits'])
def test_finetune_configs_carry_the_fine_tuning_recipe(arg):
  config = finetune_config.get_config(arg)
  train.validate_config(config)
  assert config.optimizer.weight_decay == 1e-5
  assert (config.model.kwargs.drop_rate, config.model.kwargs.stochdepth_rate) == (0.25, 0.1)
  assert config.data.name == 'folder' and config.eval.splits == 'val'
  assert (config.data.mixup_alpha, config.data.cutmix, config.data.randaug_layers) == (
    0.0,
    False,
    0,
  )
  if arg == 'digits':
    assert config.init_from == 'workdirs/digits/params_ema.npz'
  else:
    assert config.init_from == ''  # the released file is the user's to pass
    ref = nfnet_config.get_config(arg)
    assert (config.data.image_size, config.data.eval_image_size) == (
      ref.data.image_size,
      ref.data.eval_image_size,
    )
    assert config.optimizer.base_lr == ref.optimizer.base_lr / 10


def tiny_family_config(family):
  """digits, with a narrow NF-ResNet-50 or NF-RegNet-B0 at the released defaults."""
  config = tiny_config(num_steps=2)
  if family == 'NFResNet':
    config.model = nf_resnet_config.get_config('ResNet50').model
    config.model.kwargs.update(width=0.125, drop_rate=0.1)
  else:
    config.model = nf_regnet_config.get_config('B0').model
    config.model.kwargs.width = 0.25
  config.data.image_size = 32
  config.optimizer.clipping = 0.0
  return config


@pytest.mark.slow
@pytest.mark.parametrize('family,root', [('NFResNet', 'NF_ResNet'), ('NFRegNet', 'NF_RegNet')])
def test_other_families_train_export_evaluate_and_classify(tmp_path, family, root):
  """The training loop, the exported params_ema.npz, --weights evaluation, fine-tuning
  to new classes and nfnet-classify work for NF-ResNets and NF-RegNets as for NFNets."""
  from nfnet_jax import classify  # pylint: disable=g-import-not-at-top

  config = tiny_family_config(family)
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(config, workdir, progress_bar=False)
  assert np.isfinite(final['eval_loss']) and final['eval_count'] == 360
  exported = os.path.join(workdir, weights.EXPORT_FILE)
  width = config.model.kwargs.width
  params = weights.load_pretrained(exported, num_classes=None, width=width)
  assert {m.split('/~/')[0] for m in params} == {root}

  from_checkpoint = train.evaluate(config, workdir)
  from_weights = train.evaluate(config, str(tmp_path / 'eval_only'), weights=exported)
  np.testing.assert_allclose(from_weights['eval_top1'], from_checkpoint['eval_ema_top1'])
  np.testing.assert_allclose(from_weights['eval_loss'], from_checkpoint['eval_ema_loss'], rtol=1e-5)

  config3 = tiny_family_config(family)
  config3.init_from = exported
  model, optimizer, _ = _model_and_steps(config3, num_classes=3)
  fresh = jax.tree.map(
    np.asarray, steps.init_state(jax.random.PRNGKey(7), model, optimizer, 32).params
  )
  start = weights.initial_params(config3.model, config3.init_from, fresh, 3)
  head = f'{root}/~/linear'
  for module in start:
    source = fresh if module == head else params
    for name in start[module]:
      np.testing.assert_array_equal(start[module][name], source[module][name])

  # Classify two digits with the exported weights: the probabilities are the model's
  # softmax on the family's evaluation view (crop_resize), computed here directly.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  paths = []
  for i, digit in enumerate(load_digits().images[:2]):
    path = str(tmp_path / f'digit{i}.png')
    Image.fromarray((digit * 255 / 16).astype(np.uint8)).convert('RGB').save(path)
    paths.append(path)
  variant = config.model.kwargs.variant
  kwargs = {k: v for k, v in dict(config.model.kwargs).items() if k != 'variant'}
  names = [str(d) for d in range(10)]
  results = classify.classify(
    paths, params, variant=variant, class_names=names, image_size=32, top_k=3, model_kwargs=kwargs
  )
  model = models.build_model(config.model, 10, 'float32')
  for path, result in zip(paths, results):
    with open(path, 'rb') as f:
      view = data.eval_image(f.read(), 32, 'crop_resize')
    probs = jax.nn.softmax(model.apply(params, None, view[None], is_training=False)['logits'])
    top = np.argsort(-np.asarray(probs[0]), kind='stable')[:3]
    assert [p['label'] for p in result['predictions']] == list(top)
    np.testing.assert_allclose(
      [p['probability'] for p in result['predictions']], np.asarray(probs[0])[top], rtol=1e-5
    )


@pytest.mark.parametrize('variant,family', [('B3', 'NFRegNet'), ('ResNet101', 'NFResNet')])
def test_finetune_configs_take_every_family(variant, family):
  config = finetune_config.get_config(variant)
  train.validate_config(config)
  assert config.model.name == family and config.model.kwargs.variant == variant
  assert (config.model.kwargs.drop_rate, config.model.kwargs.stochdepth_rate) == (0.25, 0.1)
  assert config.optimizer.weight_decay == 1e-5
  assert config.data.eval_preprocess == 'crop_resize'
  sizes = {'B3': helpers.NF_REGNET_SIZES['B3'], 'ResNet101': (224, 224)}[variant]
  assert (config.data.image_size, config.data.eval_image_size) == sizes
  with pytest.raises(
    ValueError, match='NFNet: F0, .*NF-ResNet: NF-ResNet50, .*NF-RegNet: NF-RegNet-B0'
  ):
    finetune_config.get_config('B10')


@pytest.mark.slow
def test_quickstart_command_trains_digits(tmp_path):
  """The README's main command, shortened: real CLI, real recipe, real digits."""
  workdir = str(tmp_path / 'workdirs' / 'digits')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  # A relative --workdir, as in the README (Orbax itself refuses relative paths).
  cmd = [
    sys.executable,
    '-m',
    'nfnet_jax.train',
    '--config',
    os.path.join(REPO, 'experiments', 'digits.py'),
    '--workdir',
    'workdirs/digits',
    '--config.train.num_epochs=8',
    '--config.train.eval_every_steps=1000',
  ]
  proc = subprocess.run(
    cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'eval_ema_top1=' in proc.stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  final = [r for r in records if 'eval_ema_top1' in r][-1]
  assert final['eval_count'] == 360
  assert final['eval_top1'] >= 0.9, final
  assert any(r.get('agc_clip_fraction', 0) > 0 for r in records), 'AGC should clip sometimes'
  assert os.path.isdir(os.path.join(workdir, 'tensorboard'))
  assert os.path.isfile(os.path.join(workdir, weights.EXPORT_FILE))


@pytest.mark.slow
def test_trains_on_an_image_folder_with_the_papers_augmentation(tmp_path):
  """The ImageNet code path end to end on a folder: fused crop, MixUp/CutMix soft labels,
  RandAugment, uint8 batches normalised on the device, eval at a larger test size, the
  class index pinned next to the checkpoints."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  root = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for c, name in enumerate(('gull', 'crow', 'wren')):
    for i in range(14):
      (root / name).mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (30 + i, 40 - i, 3), np.uint8)
      pixels[..., c] = 255  # a learnable colour cue per class
      Image.fromarray(pixels).save(root / name / f'{i}.{"jpg" if i % 2 else "png"}')
  config = tiny_config(num_steps=3)
  config.data.update(
    name='folder',
    folder=str(root),
    holdout_fraction=0.25,
    image_size=16,
    eval_image_size=24,
    mixup_alpha=0.2,
    cutmix=True,
    randaug_layers=2,
    randaug_magnitude=10.0,
    shuffle_buffer=64,
  )
  config.eval.update(splits='holdout', batch_size=8)
  info = data.dataset_info(config.data)
  assert info.class_names == ('crow', 'gull', 'wren')
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir, progress_bar=False)
  assert results['eval_count'] == info.num_examples['holdout'] > 0
  records = [r for r in metrics_lib.read_metrics(workdir) if 'loss' in r]
  assert [r['step'] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in records)
  assert checkpoint_lib.read_class_index(workdir) == ['crow', 'gull', 'wren']

  # A new class would shift the labels under the checkpoint: refused, nothing changed.
  (root / 'dove').mkdir()
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), np.uint8)).save(root / 'dove' / '0.png')
  listing = sorted(os.listdir(workdir))
  metrics_before = open(os.path.join(workdir, 'metrics.jsonl'), 'rb').read()
  data.folder._INDEX_CACHE.clear()
  with pytest.raises(ValueError, match="differ from label 1 on .*'dove'"):
    train.train_and_evaluate(config, workdir, progress_bar=False)
  assert sorted(os.listdir(workdir)) == listing
  assert open(os.path.join(workdir, 'metrics.jsonl'), 'rb').read() == metrics_before


@pytest.mark.slow
def test_exported_weights_evaluate_like_the_checkpoint_and_seed_fine_tuning(tmp_path):
  """params_ema.npz is written at the end of training; `--weights` evaluates it through
  the normal eval path; init_from starts a run with new classes from it."""
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_steps=2)
  train.train_and_evaluate(config, workdir, progress_bar=False)
  exported = os.path.join(workdir, weights.EXPORT_FILE)
  params = weights.load_pretrained(exported, 'F0', 10, width=0.0625, group_size=8)

  from_checkpoint = train.evaluate(config, workdir)
  from_weights = train.evaluate(config, str(tmp_path / 'eval_only'), weights=exported)
  assert from_weights['eval_count'] == 360
  assert from_weights['eval_top1'] == from_weights['eval_ema_top1']
  np.testing.assert_allclose(from_weights['eval_top1'], from_checkpoint['eval_ema_top1'])
  np.testing.assert_allclose(from_weights['eval_loss'], from_checkpoint['eval_ema_loss'], rtol=1e-5)
  assert not os.path.exists(os.path.join(str(tmp_path / 'eval_only'), 'checkpoints'))

  # Fine-tuning to 3 classes: everything but the classifier comes from the file.
  config3 = tiny_config()
  config3.init_from = exported
  model, optimizer, _ = _model_and_steps(config3, num_classes=3)
  fresh = jax.tree.map(
    np.asarray, steps.init_state(jax.random.PRNGKey(7), model, optimizer, 16).params
  )
  start = weights.initial_params(config3.model, config3.init_from, fresh, 3)
  assert sorted(start) == sorted(fresh)
  for module in start:
    source = fresh if module == 'NFNet/~/linear' else params
    for name in start[module]:
      np.testing.assert_array_equal(start[module][name], source[module][name])
  assert start['NFNet/~/linear']['w'].shape[1] == 3

  config3.model.kwargs.width = 0.125  # weights of another width: a clear error
  with pytest.raises(weights.ParamsMismatchError, match=r'final_conv/w: expected shape'):
    weights.initial_params(config3.model, config3.init_from, fresh, 3)


def test_help_lists_the_trainers_flags():
  proc = subprocess.run(
    [sys.executable, '-m', 'nfnet_jax.train', '--help'],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith('Training and evaluation')
  for flag in ('--config', '--workdir', '--mode', '--weights', '--coordinator_address'):
    assert flag in proc.stdout
