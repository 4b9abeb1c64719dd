"""Resuming the training stream: ``train_iterator(start_step=k)`` yields exactly the
batches an uninterrupted run yields after k steps (digits, image folders; TFDS in
test_tfds.py), with and without augmentation, across epochs, per process and with the
cache; each epoch is a new order; and resuming does not decode the skipped epochs."""

import numpy as np
import pytest
import tensorflow as tf

from nfnet_jax import data
from nfnet_jax.data import digits, folder, sources
from tests.data.helpers import (
  MIX_AND_RANDAUGMENT,
  assert_resumes_exactly,
  data_config,
  resume_point,
  train_batches,
  write_image_folder,
)

NUM_DIGITS_TRAIN = 1437  # digits' train split (see test_digits)


# ---------------------------------------------------------------------------------------
# Digits.
# ---------------------------------------------------------------------------------------


def test_digits_resume_without_augmentation():
  cfg = data_config(image_size=8, augment=False)
  # One process: shard 1437, 16 per step. Also from inside epoch 0, from step 1436
  # (its batch is the last 16 examples of epoch 15: 1437 steps are exactly 16 epochs)
  # and from inside epoch 16.
  steps = (3, resume_point(NUM_DIGITS_TRAIN, 16), NUM_DIGITS_TRAIN - 1, 1440)
  assert_resumes_exactly(cfg, steps, per_device_batch=8, local_devices=2, seed=5)


@pytest.mark.parametrize('process_index', [0, 1])
def test_digits_resume_with_mixing_and_randaugment_per_process(process_index):
  cfg = data_config(image_size=16, **MIX_AND_RANDAUGMENT)
  shard = len(range(process_index, NUM_DIGITS_TRAIN, 2))  # 719 and 718
  assert_resumes_exactly(
    cfg,
    (resume_point(shard, 16),),
    per_device_batch=8,
    local_devices=2,
    seed=1,
    process_index=process_index,
    process_count=2,
  )


def test_digits_resume_with_the_cache_and_per_example_augmentation():
  cfg = data_config(image_size=16, cache=True, mixup_alpha=0.4)
  assert_resumes_exactly(
    cfg, (resume_point(NUM_DIGITS_TRAIN, 32),), per_device_batch=16, local_devices=2, seed=2
  )


def test_the_resumed_stream_differs_by_seed_and_by_process():
  cfg = data_config(image_size=8, augment=False)
  kwargs = dict(per_device_batch=8, local_devices=1, start_step=200)
  a = train_batches(cfg, 1, seed=0, **kwargs)[0]['images']
  b = train_batches(cfg, 1, seed=1, **kwargs)[0]['images']
  c = train_batches(cfg, 1, seed=0, process_index=1, process_count=2, **kwargs)[0]['images']
  assert not np.array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize('start_step', [-1, 1.5, True, '3'])
def test_bad_start_step(start_step):
  with pytest.raises(ValueError, match=r'start_step must be an integer >= 0, got'):
    data.train_iterator(
      data_config(), per_device_batch=2, local_devices=1, seed=0, start_step=start_step
    )


# ---------------------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------------------


def _folder_config(root, **overrides):
  folder._INDEX_CACHE.clear()  # a fresh tree per test
  return data_config(name='folder', folder=str(root), image_size=16, shuffle_buffer=4, **overrides)


@pytest.mark.parametrize('process_index, shard', [(0, 8), (1, 7)])  # 15 images, 2 processes
@pytest.mark.parametrize('augment', [dict(augment=False), MIX_AND_RANDAUGMENT])
def test_folder_resume_per_process(tmp_path, augment, process_index, shard):
  write_image_folder(tmp_path, per_class=(5, 4, 6))
  cfg = _folder_config(tmp_path, **augment)
  assert data.split_size(cfg, 'train') == 15
  assert_resumes_exactly(
    cfg,
    (resume_point(shard, 6),),
    per_device_batch=3,
    local_devices=2,
    seed=4,
    process_index=process_index,
    process_count=2,
  )


def test_folder_epochs_are_new_orders_of_the_same_images(tmp_path):
  n = write_image_folder(tmp_path)
  cfg = _folder_config(tmp_path, augment=False)
  # A batch of the whole split: batch e is epoch e.
  epochs = [
    b['images'][0] for b in train_batches(cfg, 3, per_device_batch=n, local_devices=1, seed=0)
  ]

  def as_set(images):
    return sorted(image.tobytes() for image in images)

  assert len(set(as_set(epochs[0]))) == n  # every image once
  for e in (1, 2):
    assert as_set(epochs[e]) == as_set(epochs[0])
    assert not np.array_equal(epochs[e], epochs[0])
  assert not np.array_equal(epochs[1], epochs[2])


# ---------------------------------------------------------------------------------------
# What resuming costs.
# ---------------------------------------------------------------------------------------


class _CountingDigits(sources.DataSource):
  """The digits, counting the raw examples read and the examples preprocessed."""

  name = 'counting_digits'

  def __init__(self):
    self.reads = 0
    self.decodes = 0

  def _count(self, attribute, structure):
    def tick():
      setattr(self, attribute, getattr(self, attribute) + 1)
      return np.int64(0)

    with tf.control_dependencies([tf.py_function(tick, [], tf.int64)]):
      return tf.nest.map_structure(tf.identity, structure)

  def info(self, data_config):
    return digits.SOURCE.info(data_config)

  def examples(self, data_config, split, *, process_index, process_count, shuffle_seed=None):
    ds, size = digits.SOURCE.examples(
      data_config,
      split,
      process_index=process_index,
      process_count=process_count,
      shuffle_seed=shuffle_seed,
    )
    return ds.map(lambda ex: self._count('reads', ex)), size

  def shard_size(self, data_config, split, *, process_index, process_count):
    return digits.SOURCE.shard_size(
      data_config, split, process_index=process_index, process_count=process_count
    )

  def preprocess(self, example, data_config, *, rng):
    return self._count('decodes', digits.SOURCE.preprocess(example, data_config, rng=rng))


@pytest.fixture
def counting_source(monkeypatch):
  monkeypatch.setattr(sources, '_SOURCES', dict(sources._SOURCES))
  return sources.register_source(_CountingDigits())


@pytest.mark.parametrize('cache', [False, True])
def test_resuming_skips_whole_epochs_without_reading_or_decoding_them(counting_source, cache):
  cfg = data_config(name='counting_digits', image_size=8, cache=cache)
  start_step = 1000  # 16,000 examples: 11 epochs of 1437 and 193 more
  train_batches(cfg, 2, per_device_batch=8, local_devices=2, seed=0, start_step=start_step)
  # Replaying the skipped epochs would read and decode 16,000 examples; skipping them
  # arithmetically reads at most the current epoch (the shuffle buffer holds all of it)
  # and the next one's start, and decodes only what is yielded and prefetched.
  assert counting_source.reads <= 2 * NUM_DIGITS_TRAIN
  assert 32 <= counting_source.decodes < NUM_DIGITS_TRAIN


def test_the_cache_is_filled_once_and_reused_every_epoch(counting_source):
  cfg = data_config(name='counting_digits', image_size=8, augment=False, cache=True)
  it = data.train_iterator(cfg, per_device_batch=479, local_devices=1, seed=0)
  epochs = [np.concatenate([next(it)['labels'] for _ in range(3)]) for _ in range(3)]
  assert counting_source.reads == NUM_DIGITS_TRAIN  # three epochs, one pass of the source
  assert not np.array_equal(epochs[0], epochs[1])  # still a new order each epoch
  np.testing.assert_array_equal(np.sort(epochs[0].ravel()), np.sort(epochs[2].ravel()))
