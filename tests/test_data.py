"""Tests for nfnet_jax.data: the interface, the digits split and the tf.data pipeline."""
import collections
import hashlib

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from nfnet_jax import data
from nfnet_jax.data import digits
from nfnet_jax.data import pipeline

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def _config(**overrides):
  cfg = data.default_data_config()
  cfg.update(overrides)
  return cfg


def _denorm(images):
  return images * STD + MEAN


def _raw_split(split):
  """Independent of the module: straight from sklearn, by the module's indices."""
  raw = sk_datasets.load_digits()
  idx = digits.split_indices(split)
  return raw.images[idx], raw.target[idx]


def _fingerprints(images8, labels):
  """0..255 images at 8x8 -> hashable (raw 0..16 bytes, label) per example."""
  raw = np.rint(images8[..., 0] * 16 / 255).astype(np.uint8)
  return [(r.tobytes(), int(l)) for r, l in zip(raw, labels)]


def _bilinear_upsample_np(x, size):
  """NumPy bilinear resize, half-pixel centres, no antialiasing (x: [N, h, w])."""
  def weights(n_in, n_out):
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (pos - lo))
    np.add.at(m, (np.arange(n_out), hi), pos - lo)
    return m
  wh, ww = weights(x.shape[1], size), weights(x.shape[2], size)
  return np.einsum('oh,nhw,pw->nop', wh, x, ww)


# ---------------------------------------------------------------------------------------
# Interface and split.
# ---------------------------------------------------------------------------------------

def test_default_config_and_info():
  cfg = data.default_data_config()
  assert cfg.name == 'digits' and cfg.image_size == 32
  assert {'augment', 'shuffle_buffer', 'max_shift'} <= set(cfg.keys())
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(name='digits', num_classes=10,
                                  num_examples={'train': 1437, 'test': 360},
                                  class_names=tuple('0123456789'))
  assert 'digits' in data.known_datasets()
  np.testing.assert_allclose(data.MEAN_RGB, MEAN, rtol=1e-6)
  np.testing.assert_allclose(data.STDDEV_RGB, STD, rtol=1e-6)


def test_split_is_fixed_disjoint_and_stratified():
  train, test = digits.split_indices('train'), digits.split_indices('test')
  assert len(train) == 1437 and len(test) == 360
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
  # Stable: the same on every call, and frozen (a changed split breaks comparability).
  np.testing.assert_array_equal(digits._split_indices.__wrapped__()['test'], test)
  assert hashlib.sha256(test.astype('<i8').tobytes()).hexdigest() == (
      'd9a9f8df571cdcbf9686f0ce69b192da80cdd31074905ab145a5b463224a44d5')
  # Stratified: every class contributes 20% of its examples to test, to within one example.
  labels = sk_datasets.load_digits().target
  per_class = np.bincount(labels, minlength=10)
  test_per_class = np.bincount(labels[test], minlength=10)
  assert np.all(np.abs(test_per_class - per_class * 360 / 1797) < 1)
  # load_split agrees with sklearn's raw arrays.
  images, y = digits.load_split('test')
  raw_images, raw_y = _raw_split('test')
  np.testing.assert_array_equal(images, raw_images)
  np.testing.assert_array_equal(y, raw_y)


def test_unknown_name_and_split_errors():
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'.*digits"):
    data.dataset_info(_config(name='mnist'))
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'.*digits"):
    data.train_iterator(_config(name='mnist'), per_device_batch=2, local_devices=1, seed=0)
  with pytest.raises(ValueError, match=r"Unknown split 'validation'.*train, test"):
    data.eval_iterator(_config(), split='validation', per_device_batch=2, local_devices=1)


@pytest.mark.parametrize('kwargs, match', [
    (dict(per_device_batch=0, local_devices=1), 'per_device_batch'),
    (dict(per_device_batch=2, local_devices=0), 'local_devices'),
    (dict(per_device_batch=2.5, local_devices=1), 'per_device_batch'),
    (dict(per_device_batch=2, local_devices=1, process_index=3, process_count=3),
     'process_index'),
    (dict(per_device_batch=1000, local_devices=2), 'does not fit'),
])
def test_bad_batch_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.train_iterator(_config(), seed=0, **kwargs)
  if match != 'does not fit':  # Eval pads instead.
    with pytest.raises(ValueError, match=match):
      data.eval_iterator(_config(), split='test', **kwargs)


# ---------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------

def test_train_batch_shapes_dtypes_ranges():
  it = data.train_iterator(_config(), per_device_batch=8, local_devices=2, seed=0)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {'images', 'labels'}
    # Training images stay uint8 pixels; the train step normalises them on the device.
    assert batch['images'].shape == (2, 8, 32, 32, 3) and batch['images'].dtype == np.uint8
    assert batch['labels'].shape == (2, 8) and batch['labels'].dtype == np.int32
    assert batch['labels'].min() >= 0 and batch['labels'].max() <= 9
    assert batch['images'].max() > 200   # the full 0..255 range, not 0..16
    gray = batch['images']
    np.testing.assert_array_equal(gray[..., 1], gray[..., 0])
    np.testing.assert_array_equal(gray[..., 2], gray[..., 0])
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert not tf.config.get_visible_devices('GPU')


def test_eval_at_native_size_is_exact_normalisation_of_raw():
  cfg = _config(image_size=8)
  batches = list(data.eval_iterator(cfg, split='test', per_device_batch=50, local_devices=2))
  assert len(batches) == data.eval_steps(cfg, split='test', per_device_batch=50,
                                         local_devices=2) == 4
  for b in batches:
    assert b['images'].shape == (2, 50, 8, 8, 3) and b['images'].dtype == np.float32
    assert b['labels'].dtype == np.int32 and b['mask'].dtype == np.float32
  images = np.concatenate([b['images'].reshape(-1, 8, 8, 3) for b in batches])
  labels = np.concatenate([b['labels'].reshape(-1) for b in batches])
  mask = np.concatenate([b['mask'].reshape(-1) for b in batches])
  assert mask.sum() == 360 and np.all(mask[:360] == 1) and np.all(mask[360:] == 0)
  raw, raw_y = _raw_split('test')
  # Normalised images against NumPy, per channel, and the de-normalised ones against raw.
  expected = (raw[..., None] * 255 / 16 - MEAN) / STD
  np.testing.assert_allclose(images[:360], expected, atol=1e-5)
  for c in range(3):
    np.testing.assert_allclose(_denorm(images[:360])[..., c], raw * 255 / 16, atol=1e-3)
  real64 = images[:360].astype(np.float64)  # Accumulate statistics in float64.
  np.testing.assert_allclose(real64.mean((0, 1, 2)), expected.mean((0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(real64.std((0, 1, 2)), expected.std((0, 1, 2)), atol=1e-5)
  np.testing.assert_array_equal(labels[:360], raw_y)
  assert np.all(images[360:] == 0) and np.all(labels[360:] == 0)


def test_eval_resize_is_bilinear_half_pixel_without_antialias():
  batch = next(data.eval_iterator(_config(image_size=32), split='test', per_device_batch=16,
                                  local_devices=1))
  raw, _ = _raw_split('test')
  expected = _bilinear_upsample_np(raw[:16] * 255 / 16, 32)
  np.testing.assert_allclose(_denorm(batch['images'][0])[..., 0], expected, atol=1e-3)


@pytest.mark.parametrize('process_count, per_device_batch, local_devices',
                         [(3, 7, 2), (4, 5, 1), (7, 3, 3)])
def test_eval_over_processes_counts_every_example_once(process_count, per_device_batch,
                                                       local_devices):
  cfg = _config(image_size=8)
  steps = data.eval_steps(cfg, split='test', per_device_batch=per_device_batch,
                          local_devices=local_devices, process_count=process_count)
  seen = collections.Counter()
  for p in range(process_count):
    batches = list(data.eval_iterator(
        cfg, split='test', per_device_batch=per_device_batch, local_devices=local_devices,
        process_index=p, process_count=process_count))
    assert len(batches) == steps  # The same on every process: no collective hangs.
    for b in batches:
      assert b['images'].shape == (local_devices, per_device_batch, 8, 8, 3)
      assert b['mask'].shape == (local_devices, per_device_batch)
      assert set(np.unique(b['mask'])) <= {0.0, 1.0}
      real = b['mask'].reshape(-1) == 1
      imgs = _denorm(b['images'].reshape(-1, 8, 8, 3))
      seen.update(_fingerprints(imgs[real], b['labels'].reshape(-1)[real]))
  raw, raw_y = _raw_split('test')
  expected = collections.Counter((r.astype(np.uint8).tobytes(), int(l))
                                 for r, l in zip(raw, raw_y))
  assert seen == expected
  assert sum(seen.values()) == 360


def test_train_shards_before_shuffling_and_reshuffles_each_epoch():
  """With a batch of exactly one shard, each batch is one epoch of that process's shard."""
  cfg = _config(image_size=8, augment=False)
  train_raw, train_y = _raw_split('train')
  shard = train_raw[1::2], train_y[1::2]  # Process 1 of 2 gets examples 1, 3, 5, ...
  it = data.train_iterator(cfg, per_device_batch=359, local_devices=2, seed=3,
                           process_index=1, process_count=2)
  expected = collections.Counter((r.astype(np.uint8).tobytes(), int(l))
                                 for r, l in zip(*shard))
  epochs = []
  for _ in range(2):
    b = next(it)
    fp = _fingerprints(b['images'].reshape(-1, 8, 8, 3).astype(np.float32),
                       b['labels'].reshape(-1))
    assert collections.Counter(fp) == expected
    epochs.append(fp)
  assert epochs[0] != epochs[1]  # Reshuffled.
  assert [fp[1] for fp in epochs[0]] != list(shard[1])  # Shuffled at all.


def test_same_seed_same_batches_different_seed_different():
  cfg = _config(augment=True)

  def first(seed, n=3):
    it = data.train_iterator(cfg, per_device_batch=4, local_devices=2, seed=seed)
    return [next(it) for _ in range(n)]

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['images'], y['images'])
    np.testing.assert_array_equal(x['labels'], y['labels'])
  assert not np.array_equal(a[0]['images'], c[0]['images'])


def test_augmentation_is_a_small_translation_without_flips():
  cfg = _config(image_size=8, augment=True, max_shift=0.125)  # Pad 1 px: shifts in {-1,0,1}.
  b = next(data.train_iterator(cfg, per_device_batch=32, local_devices=1, seed=0))
  images = np.rint(b['images'][0][..., 0].astype(np.float32) * 16 / 255)
  labels = b['labels'][0]
  train_raw, train_y = _raw_split('train')
  padded = np.pad(train_raw, ((0, 0), (1, 1), (1, 1)))
  shifts = {(dy, dx): padded[:, 1 + dy:9 + dy, 1 + dx:9 + dx]
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
  used = collections.Counter()
  for img, label in zip(images, labels):
    matches = [s for s, shifted in shifts.items()
               if np.any(np.all(shifted[train_y == label] == img, axis=(1, 2)))]
    assert matches, 'augmented image is not a translation of a train example of its class'
    used[matches[0]] += 1
  assert sum(n for s, n in used.items() if s != (0, 0)) > 0


def test_pad_with_mask_helper():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_tensor_slices({'x': np.arange(5, dtype=np.float32)})
  out = list(pipeline.pad_with_mask(ds, num_real=5, padded_size=8).as_numpy_iterator())
  np.testing.assert_array_equal([e['x'] for e in out], [0, 1, 2, 3, 4, 0, 0, 0])
  np.testing.assert_array_equal([e['mask'] for e in out], [1, 1, 1, 1, 1, 0, 0, 0])
  with pytest.raises(ValueError):
    pipeline.pad_with_mask(ds, num_real=5, padded_size=4)
