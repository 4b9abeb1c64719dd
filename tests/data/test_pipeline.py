"""The tf.data pipeline (nfnet_jax.data.pipeline), on the digits: argument checks, batch
formats, per-process sharding, shuffling and seeds, padding, and the cache warning."""

import collections
import logging

import numpy as np
import pytest
import tensorflow as tf

from nfnet_jax import data
from nfnet_jax.data import pipeline
from tests.data.helpers import data_config, denorm, fingerprints, raw_split


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(per_device_batch=0, local_devices=1), 'per_device_batch'),
    (dict(per_device_batch=2, local_devices=0), 'local_devices'),
    (dict(per_device_batch=2.5, local_devices=1), 'per_device_batch'),
    (dict(per_device_batch=2, local_devices=1, process_index=3, process_count=3), 'process_index'),
    (dict(per_device_batch=1000, local_devices=2), 'does not fit'),
  ],
)
def test_bad_batch_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.train_iterator(data_config(), seed=0, **kwargs)
  if match != 'does not fit':  # Eval pads instead.
    with pytest.raises(ValueError, match=match):
      data.eval_iterator(data_config(), split='test', **kwargs)


def test_train_batch_shapes_dtypes_ranges():
  it = data.train_iterator(data_config(), per_device_batch=8, local_devices=2, seed=0)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {'images', 'labels'}
    # Training images stay uint8 pixels; the train step normalises them on the device.
    assert batch['images'].shape == (2, 8, 32, 32, 3) and batch['images'].dtype == np.uint8
    assert batch['labels'].shape == (2, 8) and batch['labels'].dtype == np.int32
    assert batch['labels'].min() >= 0 and batch['labels'].max() <= 9
    assert batch['images'].max() > 200  # the full 0..255 range, not 0..16
    gray = batch['images']
    np.testing.assert_array_equal(gray[..., 1], gray[..., 0])
    np.testing.assert_array_equal(gray[..., 2], gray[..., 0])
  assert not tf.config.get_visible_devices('GPU')


@pytest.mark.parametrize(
  'process_count, per_device_batch, local_devices', [(3, 7, 2), (4, 5, 1), (7, 3, 3)]
)
def test_eval_over_processes_counts_every_example_once(
  process_count, per_device_batch, local_devices
):
  cfg = data_config(image_size=8)
  steps = data.eval_steps(
    cfg,
    split='test',
    per_device_batch=per_device_batch,
    local_devices=local_devices,
    process_count=process_count,
  )
  seen = collections.Counter()
  for p in range(process_count):
    batches = list(
      data.eval_iterator(
        cfg,
        split='test',
        per_device_batch=per_device_batch,
        local_devices=local_devices,
        process_index=p,
        process_count=process_count,
      )
    )
    assert len(batches) == steps  # The same on every process: no collective hangs.
    for b in batches:
      assert b['images'].shape == (local_devices, per_device_batch, 8, 8, 3)
      assert b['mask'].shape == (local_devices, per_device_batch)
      assert set(np.unique(b['mask'])) <= {0.0, 1.0}
      real = b['mask'].reshape(-1) == 1
      imgs = denorm(b['images'].reshape(-1, 8, 8, 3))
      seen.update(fingerprints(imgs[real], b['labels'].reshape(-1)[real]))
  raw, raw_y = raw_split('test')
  expected = collections.Counter(
    (r.astype(np.uint8).tobytes(), int(label)) for r, label in zip(raw, raw_y, strict=True)
  )
  assert seen == expected
  assert sum(seen.values()) == 360


def test_train_shards_before_shuffling_and_reshuffles_each_epoch():
  """With a batch of exactly one shard, each batch is one epoch of that process's shard."""
  cfg = data_config(image_size=8, augment=False)
  train_raw, train_y = raw_split('train')
  shard = train_raw[1::2], train_y[1::2]  # Process 1 of 2 gets examples 1, 3, 5, ...
  it = data.train_iterator(
    cfg, per_device_batch=359, local_devices=2, seed=3, process_index=1, process_count=2
  )
  expected = collections.Counter(
    (r.astype(np.uint8).tobytes(), int(label)) for r, label in zip(*shard, strict=True)
  )
  epochs = []
  for _ in range(2):
    b = next(it)
    fp = fingerprints(b['images'].reshape(-1, 8, 8, 3).astype(np.float32), b['labels'].reshape(-1))
    assert collections.Counter(fp) == expected
    epochs.append(fp)
  assert epochs[0] != epochs[1]  # Reshuffled.
  assert [fp[1] for fp in epochs[0]] != list(shard[1])  # Shuffled at all.


def test_same_seed_same_batches_different_seed_different():
  cfg = data_config(augment=True)

  def first(seed, n=3):
    it = data.train_iterator(cfg, per_device_batch=4, local_devices=2, seed=seed)
    return [next(it) for _ in range(n)]

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['images'], y['images'])
    np.testing.assert_array_equal(x['labels'], y['labels'])
  assert not np.array_equal(a[0]['images'], c[0]['images'])


def test_pad_with_mask_helper():
  ds = tf.data.Dataset.from_tensor_slices({'x': np.arange(5, dtype=np.float32)})
  out = list(pipeline.pad_with_mask(ds, num_real=5, padded_size=8).as_numpy_iterator())
  np.testing.assert_array_equal([e['x'] for e in out], [0, 1, 2, 3, 4, 0, 0, 0])
  np.testing.assert_array_equal([e['mask'] for e in out], [1, 1, 1, 1, 1, 0, 0, 0])
  with pytest.raises(ValueError):
    pipeline.pad_with_mask(ds, num_real=5, padded_size=4)


def test_cache_warns_when_it_would_not_fit_in_host_ram(caplog):
  ds = tf.data.Dataset.range(3)
  cfg = data.default_data_config()
  assert pipeline.maybe_cache(ds, cfg, 10**15, 'ImageNet') is ds  # cache off: untouched
  cfg.cache = True
  with caplog.at_level(logging.WARNING):
    small = pipeline.maybe_cache(ds, cfg, 1000, 'a small split')
  assert not caplog.records
  with caplog.at_level(logging.WARNING):
    big = pipeline.maybe_cache(ds, cfg, 10**15, 'the train split of ImageNet')
  warning = caplog.records[-1].getMessage()
  assert 'about 1000000.0 GB of the train split of ImageNet' in warning
  assert '--config.data.cache=False' in warning
  for cached in (small, big):  # still the same elements
    assert list(cached.as_numpy_iterator()) == [0, 1, 2]
