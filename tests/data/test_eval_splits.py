"""Several evaluation sets (`eval.splits`): splits of the training dataset, ImageNet-v2 and
ImageNet ReaL (multi-label top-1, examples without labels left out), under
tfds.testing.mock_data and as tiny real TFDS datasets built offline with the features of
TFDS's imagenet2012, imagenet_v2 and imagenet2012_real."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

from experiments import digits as digits_config
from nfnet_jax import data, losses, parallel, steps, train
from nfnet_jax import metrics as metrics_lib
from nfnet_jax.data import tfds_source
from tests.data.helpers import MEAN, STD, data_config

# Tiny ReaL set: example i has original label i, a constant-colour image of red value
# RED[i], and the ReaL classes REAL_SETS[i] (the second has none).
RED = [30, 70, 110, 150, 190, 230]
REAL_SETS = [[10], [], [7, 30], [41], [50, 999], [3]]
V2_LABELS = [5, 17, 999, 0, 321]
TRAIN_LABELS = [0, 1, 2, 3, 4, 5, 6, 7]
# The tiny imagenet2012 below has too few images for data.name='imagenet2012' (whose
# minival is train[:10000]); the generic TFDS source reads it with the same classes.
TINY_IMAGENET = 'tfds:imagenet2012'


def _features(label_features):
  return tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(encoding_format='jpeg'),
      'file_name': tfds.features.Text(),
      **label_features,
    }
  )


def _class_label():
  return tfds.features.ClassLabel(names_file=imagenet_common.label_names_file())


def _image(i, red=None):
  rng = np.random.default_rng(i)
  if red is None:
    return rng.integers(0, 256, (20 + i, 24, 3), np.uint8)
  image = np.full((20 + i, 24, 3), 128, np.uint8)
  image[..., 0] = red
  return image


class TinyImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS imagenet2012's features: 8 train and 6 validation images."""

  name = 'imagenet2012'
  VERSION = tfds.core.Version('5.1.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=_features({'label': _class_label()}),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    return {
      'train': self._generate_examples(TRAIN_LABELS, 0),
      'validation': self._generate_examples(RED, 100),
    }

  def _generate_examples(self, labels, offset):
    for i, label in enumerate(labels):
      yield i, {'image': _image(offset + i), 'label': label, 'file_name': f'{i}.JPEG'}


class TinyImagenetV2(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands in for TFDS imagenet_v2/matched-frequency 3.x: 5 test images."""

  name = 'imagenet_v2'
  VERSION = tfds.core.Version('3.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='matched-frequency')]

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=_features({'label': _class_label()}),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    return {'test': self._generate_examples()}

  def _generate_examples(self):
    for i, label in enumerate(V2_LABELS):
      yield i, {'image': _image(200 + i), 'label': label, 'file_name': f'{label}/{i}.jpeg'}


class TinyImagenetReal(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands in for TFDS imagenet2012_real 1.x: 6 validation images with ReaL labels."""

  name = 'imagenet2012_real'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    labels = {
      'original_label': _class_label(),
      'real_label': tfds.features.Sequence(_class_label()),
    }
    return tfds.core.DatasetInfo(
      builder=self, features=_features(labels), supervised_keys=('image', 'real_label')
    )

  def _split_generators(self, dl_manager):
    return {'validation': self._generate_examples()}

  def _generate_examples(self):
    for i, (red, labels) in enumerate(zip(RED, REAL_SETS, strict=True)):
      yield (
        i,
        {'image': _image(i, red), 'original_label': i, 'real_label': labels, 'file_name': f'{i}'},
      )


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyImagenet(data_dir=data_dir).download_and_prepare()
  TinyImagenetV2(config='matched-frequency', data_dir=data_dir).download_and_prepare()
  TinyImagenetReal(data_dir=data_dir).download_and_prepare()
  return data_dir


def _imagenet(data_dir, **overrides):
  return data_config(name=TINY_IMAGENET, data_dir=data_dir, image_size=16, **overrides)


# ---------------------------------------------------------------------------------------
# The metric.
# ---------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
  hnp.arrays(np.float32, (5, 7), elements=st.integers(-3, 3).map(float)),
  hnp.arrays(np.bool_, (5, 7)),
)
def test_label_set_top1_is_the_argmax_in_the_set(logits, sets):
  got = np.asarray(losses.label_set_top1_correct(logits, sets))
  for row, label_set, hit in zip(logits, sets, got, strict=True):
    first_max = min(c for c in range(7) if row[c] == row.max())  # ties: the lower index
    assert hit == float(label_set[first_max])


# ---------------------------------------------------------------------------------------
# Entries: syntax, names, checks.
# ---------------------------------------------------------------------------------------


def test_entries_parse_and_get_their_own_metric_prefix():
  entries = train.eval_entries('validation, imagenet_v2,train[:1%],imagenet2012_real')
  assert entries == ('validation', 'imagenet_v2', 'train[:1%]', 'imagenet2012_real')
  assert [train.eval_metric_prefix(entries, i) for i in range(4)] == [
    'eval_',
    'eval_imagenet_v2/',
    'eval_train_1pct/',
    'eval_imagenet2012_real/',
  ]
  assert train.eval_entries(['test']) == ('test',)
  for bad, says in (
    ('validation,,imagenet_v2', 'Empty evaluation entry'),
    ('test,imagenet_v2,test', 'repeated'),
    ('test,train[:1%],train[:1pct]', 'share the metric prefix'),
  ):
    with pytest.raises(ValueError, match=says) as e:
      train.eval_entries(bad)
    assert '--config.eval.splits' in str(e.value) and '\n' not in str(e.value)


def test_unknown_entries_and_other_classes_fail_at_start_naming_the_flag(tiny_dir, tmp_path):
  config = digits_config.get_config()
  config.data.update(name=TINY_IMAGENET, data_dir=tiny_dir, image_size=16)
  config.train.batch_size = 8
  config.eval.update(splits='validation,imagenet_v2,imagenet2012_real,train[:50%]', batch_size=8)
  train.check_run(config, 8)  # every entry exists and has ImageNet's classes
  for bad, says in (
    ('validation,minival_typo', 'minival_typo'),
    ('validation,imagenet_v2[:99%]x', 'imagenet_v2'),
  ):
    config.eval.splits = bad
    with pytest.raises(ValueError, match=says) as e:
      train.check_run(config, 8)
    assert str(e.value).endswith('(set by --config.eval.splits)'), e.value
  # ImageNet-v2 is labelled with ImageNet's classes, not the digits'.
  digits = data_config(data_dir=tiny_dir)
  with pytest.raises(ValueError, match=r"'imagenet_v2'.*1000 classes.*10 classes.*'digits'"):
    data.check_eval_split(digits, 'imagenet_v2')
  assert data.check_eval_split(_imagenet(tiny_dir), 'imagenet_v2[:3]') == 3
  # Not prepared: the steps to prepare it.
  with pytest.raises(tfds_source.DatasetNotPreparedError) as e:
    data.check_eval_split(
      data_config(name=TINY_IMAGENET, data_dir=str(tmp_path)), 'imagenet2012_real'
    )
  assert f'tfds build imagenet2012_real --data_dir {tmp_path}' in str(e.value)
  assert 'ILSVRC2012_img_val.tar' in str(e.value)
  assert data.split_size(_imagenet(tiny_dir), 'imagenet2012_real') == len(REAL_SETS)


# ---------------------------------------------------------------------------------------
# The batches.
# ---------------------------------------------------------------------------------------


def test_mock_data_imagenet_v2_and_real_batches():
  with tfds.testing.mock_data(num_examples=10):
    cfg = data_config(name='imagenet2012', image_size=16, eval_image_size=24)
    for entry in ('validation', 'imagenet_v2', 'imagenet2012_real'):
      assert data.check_eval_split(cfg, entry) == 10
      batches = list(data.eval_iterator(cfg, split=entry, per_device_batch=4, local_devices=2))
      assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 10
      for b in batches:
        assert b['images'].shape == (2, 4, 24, 24, 3) and b['labels'].shape == (2, 4)
        assert ('label_set' in b) == (entry == 'imagenet2012_real')
      if entry == 'imagenet2012_real':
        sets = np.concatenate([b['label_set'].reshape(8, 1000) for b in batches])
        mask = np.concatenate([b['mask'].reshape(8) for b in batches])
        assert sets.dtype == np.bool_ and not sets[mask == 0].any()  # padding: no labels
        assert sets[mask == 1].any()


def test_real_batches_carry_each_examples_label_set(tiny_dir):
  cfg = _imagenet(tiny_dir, eval_image_size=20)
  seen = {}
  for b in data.eval_iterator(cfg, split='imagenet2012_real', per_device_batch=2, local_devices=2):
    for label, hot, m in zip(
      b['labels'].reshape(-1), b['label_set'].reshape(-1, 1000), b['mask'].reshape(-1), strict=True
    ):
      if m:
        seen[int(label)] = sorted(np.flatnonzero(hot).tolist())
  assert seen == {i: sorted(s) for i, s in enumerate(REAL_SETS)}
  v2 = data.eval_iterator(cfg, split='imagenet_v2', per_device_batch=8, local_devices=1)
  b = next(v2)
  assert sorted(b['labels'][0][b['mask'][0] == 1].tolist()) == sorted(V2_LABELS)


class RedModel:
  """logits[c] = -(pooled red - centre[c])^2: predicts the class whose centre is nearest
  the image's (normalised) red value."""

  @staticmethod
  def apply(params, rng, images, is_training):
    del rng, is_training
    red = images[..., 0].mean(axis=(1, 2))
    return {'logits': -((red[:, None] - params['centre'][None, :]) ** 2)}


def _centres(predicted):
  """Centres that make example i (red RED[i]) predicted as class predicted[i]."""
  centre = np.full(1000, 100.0, np.float32)
  for red, c in zip(RED, predicted, strict=True):
    centre[c] = (red - MEAN[0]) / STD[0]
  return {'centre': centre}


def test_real_top1_matches_a_numpy_hand_computation(tiny_dir):
  raw, ema = [10, 20, 30, 40, 50, 60], [11, 21, 31, 41, 51, 61]
  config = digits_config.get_config()
  config.data.update(name=TINY_IMAGENET, data_dir=tiny_dir, image_size=16)
  config.eval.batch_size = 4  # 6 examples over 2 devices x 2: a padded second batch
  devices = jax.local_devices()[:2]
  state = steps.TrainState(
    step=np.int32(0), params=_centres(raw), opt_state=None, ema_params=_centres(ema), rng=None
  )
  p_eval = parallel.map_eval_step(steps.make_eval_step(RedModel, 1000), devices)
  results = train.evaluate_split(
    p_eval, parallel.replicate(state, devices), config, 'imagenet2012_real', devices
  )

  # By hand: the model predicts raw[i] (ema[i]); an example is correct when that class is
  # one of its ReaL labels; the example without labels counts nowhere.
  labelled = [i for i, s in enumerate(REAL_SETS) if s]
  top1 = np.mean([raw[i] in REAL_SETS[i] for i in labelled])
  ema_top1 = np.mean([ema[i] in REAL_SETS[i] for i in labelled])
  assert 0 < ema_top1 < top1 < 1
  assert results == pytest.approx(
    {'eval_count': len(labelled), 'eval_top1': top1, 'eval_ema_top1': ema_top1}
  )
  # The predictions are the intended ones (the pixels survive JPEG and the eval crop).
  batch = next(
    data.eval_iterator(config.data, split='imagenet2012_real', per_device_batch=8, local_devices=1)
  )
  images, labels = batch['images'][0][:6], batch['labels'][0][:6]
  red = images[..., 0].mean(axis=(1, 2))
  for params, predicted in ((state.params, raw), (state.ema_params, ema)):
    logits = -((red[:, None] - params['centre'][None, :]) ** 2)
    assert np.argmax(logits, -1).tolist() == [predicted[i] for i in labels]


# ---------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles a narrow F0's train and eval steps: a minute or two on CPU
def test_training_logs_every_entry_under_its_own_prefix(tiny_dir, tmp_path):
  config = digits_config.get_config()
  config.model.kwargs.update(width=0.0625, group_size=8, stochdepth_rate=0.0, drop_rate=0.0)
  config.data.update(
    name=TINY_IMAGENET, data_dir=tiny_dir, image_size=16, shuffle_buffer=8, augment=False
  )
  config.train.update(batch_size=8, num_steps=2, log_every_steps=1, eval_every_steps=1000)
  config.checkpoint.every_steps = 2
  config.eval.update(splits='validation,imagenet_v2,imagenet2012_real', batch_size=8)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir, progress_bar=False)

  labelled = sum(1 for s in REAL_SETS if s)
  assert results['eval_count'] == len(RED)  # validation: the headline, unprefixed
  assert results['eval_imagenet_v2/count'] == len(V2_LABELS)
  assert results['eval_imagenet2012_real/count'] == labelled
  for prefix in ('eval_', 'eval_imagenet_v2/'):
    assert {f'{prefix}{k}' for k in ('loss', 'top1', 'top5', 'ema_loss', 'ema_top1')} <= set(
      results
    )
  real = {k for k in results if k.startswith('eval_imagenet2012_real/')}
  assert real == {f'eval_imagenet2012_real/{k}' for k in ('count', 'top1', 'ema_top1')}
  for key, value in results.items():
    if key.endswith('top1'):
      count = results[key.rsplit('/', 1)[0] + '/count' if '/' in key else 'eval_count']
      assert value * count == pytest.approx(round(value * count))  # a fraction of count

  evals = [r for r in metrics_lib.read_metrics(workdir) if 'eval_count' in r]
  assert len(evals) == 1 and evals[0]['step'] == 2
  assert {k: v for k, v in evals[0].items() if k != 'step'} == results
  # A finished run started again returns the logged evaluation of every entry.
  assert train.train_and_evaluate(config, workdir, progress_bar=False) == results
  # --mode eval takes several entries too; the first is the unprefixed one.
  again = train.evaluate(config, workdir, split='imagenet_v2,validation')
  assert again['eval_count'] == len(V2_LABELS) and again['eval_validation/count'] == len(RED)
  assert again['eval_top1'] == pytest.approx(results['eval_imagenet_v2/top1'])
