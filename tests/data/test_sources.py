"""The dataset interface (nfnet_jax.data.sources): the data config, the registry of
sources, the DataSource interface, the shard helpers, and what each import pulls in."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from nfnet_jax import data
from nfnet_jax.data import sources
from tests.data.helpers import MEAN, STD, data_config, denorm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------
# The config and the registry.
# ---------------------------------------------------------------------------------------


def test_default_config_and_info():
  cfg = data.default_data_config()
  assert cfg.name == 'digits' and cfg.image_size == 32
  assert {'augment', 'shuffle_buffer', 'max_shift'} <= set(cfg.keys())
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(
    name='digits',
    num_classes=10,
    num_examples={'train': 1437, 'test': 360},
    class_names=tuple('0123456789'),
  )
  assert 'digits' in data.known_datasets()
  np.testing.assert_allclose(data.MEAN_RGB, MEAN, rtol=1e-6)
  np.testing.assert_allclose(data.STDDEV_RGB, STD, rtol=1e-6)


def test_unknown_name_and_split_errors():
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'.*digits"):
    data.dataset_info(data_config(name='mnist'))
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'.*digits"):
    data.train_iterator(data_config(name='mnist'), per_device_batch=2, local_devices=1, seed=0)
  with pytest.raises(ValueError, match=r"Unknown split 'validation'.*train, test"):
    data.eval_iterator(data_config(), split='validation', per_device_batch=2, local_devices=1)


def test_the_package_hands_on_its_public_names():
  for name in (
    'DatasetInfo',
    'dataset_info',
    'DatasetNotPreparedError',
    'default_data_config',
    'eval_image',
    'eval_image_size',
    'eval_iterator',
    'eval_steps',
    'get_source',
    'known_datasets',
    'MEAN_RGB',
    'STDDEV_RGB',
    'split_size',
    'train_iterator',
    'train_split',
    'IMAGE_EXTENSIONS',
    'EVAL_METHODS',
    'imagenet_classes',
  ):
    assert getattr(data, name) is not None, name
    assert name in data.__all__ and name in dir(data)
  assert data.EVAL_METHODS == ('resize_crop_32', 'crop_resize', 'crop_pct')
  assert '.jpg' in data.IMAGE_EXTENSIONS
  assert len(data.imagenet_classes()[0]) == 1000
  assert data.known_datasets() == ('digits', 'folder', 'imagenet2012', 'tfds:<name>')
  with pytest.raises(AttributeError, match='no_such_name'):
    data.no_such_name  # noqa: B018


def test_a_partial_config_is_filled_from_the_defaults():
  full = data_config(image_size=8)
  partial = ml_collections.ConfigDict({'image_size': 8})
  assert sources.with_defaults(full) is full
  filled = sources.with_defaults(partial)
  assert filled.to_dict() == full.to_dict()
  assert 'name' not in partial  # not changed in place
  assert data.dataset_info(partial) == data.dataset_info(full)
  assert data.train_split(partial) == 'train' and data.eval_image_size(partial) == 8
  assert data.split_size(partial, 'test') == 360
  assert data.eval_steps(partial, split='test', per_device_batch=50, local_devices=2) == 4
  for make in (
    lambda cfg: data.eval_iterator(cfg, split='test', per_device_batch=4, local_devices=1),
    lambda cfg: data.train_iterator(cfg, per_device_batch=4, local_devices=1, seed=1),
  ):
    a, b = next(make(partial)), next(make(full))
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ---------------------------------------------------------------------------------------
# The DataSource interface.
# ---------------------------------------------------------------------------------------


class _FlatSource(sources.DataSource):
  """Six flat grey images, level 100 for label 0 and 150 for label 1; only the required
  methods, so everything else is the interface's default."""

  name = 'flat_test_source'
  _LABELS = np.arange(6, dtype=np.int32) % 2

  def info(self, data_config):
    return sources.DatasetInfo(self.name, 2, {'train': 6}, ('dark', 'light'))

  def examples(self, data_config, split, *, process_index, process_count, shuffle_seed=None):
    ds = tf.data.Dataset.from_tensor_slices({'label': self._LABELS})
    return sources.shard_for_process(ds, process_index, process_count)

  def shard_size(self, data_config, split, *, process_index, process_count):
    return len(range(process_index, len(self._LABELS), process_count))

  def preprocess(self, example, data_config, *, rng):
    size = data_config.image_size if rng is not None else sources.eval_image_size(data_config)
    level = 100.0 + 50.0 * tf.cast(example['label'], tf.float32)
    return {
      'images': tf.fill([size, size, 3], level),
      'labels': tf.cast(example['label'], tf.int32),
    }


def test_the_interface_declares_every_method_with_defaults_for_the_optional_ones():
  with pytest.raises(TypeError, match='abstract'):
    sources.DataSource()  # pylint: disable=abstract-class-instantiated
  source, cfg = _FlatSource(), data_config()
  assert source.train_split == 'train'
  assert source.approx_bytes(cfg, 'train') is None
  source.check_split(cfg, 'train')
  with pytest.raises(
    ValueError,
    match=r"Unknown split 'test' for dataset 'flat_test_source'; "
    r'valid splits: train\.',
  ):
    source.check_split(cfg, 'test')
  for name in ('digits', 'folder', 'imagenet2012', 'tfds:mnist'):
    built_in = sources.get_source(name)
    assert isinstance(built_in, sources.DataSource), name
    for method in ('info', 'examples', 'shard_size', 'preprocess', 'check_split', 'approx_bytes'):
      assert callable(getattr(built_in, method)), (name, method)
  assert sources.get_source('tfds:mnist') is sources.get_source('tfds:mnist')


def test_a_registered_source_is_served_by_the_pipeline(monkeypatch):
  monkeypatch.setattr(sources, '_SOURCES', dict(sources._SOURCES))
  sources.register_source(_FlatSource())
  with pytest.raises(ValueError, match='already registered'):
    sources.register_source(_FlatSource())
  with pytest.raises(ValueError, match="'digits' is already registered"):
    sources.register_source(type('Digits', (_FlatSource,), {'name': 'digits'})())
  assert 'flat_test_source' in data.known_datasets()
  cfg = data_config(name='flat_test_source', image_size=4)
  assert data.dataset_info(cfg).class_names == ('dark', 'light')
  assert data.split_size(cfg, 'train') == 6
  batches = list(data.eval_iterator(cfg, split='train', per_device_batch=4, local_devices=1))
  assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 6
  images = denorm(np.concatenate([b['images'][0] for b in batches]))[:6]
  labels = np.concatenate([b['labels'][0] for b in batches])[:6]
  levels = np.broadcast_to((100 + 50 * labels)[:, None, None, None], images.shape)
  np.testing.assert_allclose(images, levels, atol=1e-3)
  with pytest.raises(ValueError, match=r"Unknown split 'test' for dataset 'flat_test_source'"):
    data.eval_iterator(cfg, split='test', per_device_batch=4, local_devices=1)
  batch = next(data.train_iterator(cfg, per_device_batch=3, local_devices=2, seed=0))
  assert batch['images'].dtype == np.uint8
  np.testing.assert_array_equal(batch['images'][..., 0, 0, 0], 100 + 50 * batch['labels'])


# ---------------------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('n, process_count', [(10, 3), (2, 4), (0, 2), (7, 7), (1437, 8)])
def test_even_shard_bounds_cover_the_split_larger_shards_first(n, process_count):
  bounds = [sources.even_shard_bounds(n, p, process_count) for p in range(process_count)]
  assert bounds[0][0] == 0 and bounds[-1][1] == n
  assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
  sizes = [end - start for start, end in bounds]
  assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


def test_shard_for_process_deals_examples_round_robin():
  ds = tf.data.Dataset.range(7)
  for p in range(3):
    shard, size = sources.shard_for_process(ds, p, 3)
    assert list(shard.as_numpy_iterator()) == list(range(p, 7, 3)) and size == len(range(p, 7, 3))
  _, size = sources.shard_for_process(ds.filter(lambda x: x > 2), 0, 2)
  assert size is None  # unknown cardinality


# ---------------------------------------------------------------------------------------
# What imports pull in (fresh interpreters).
# ---------------------------------------------------------------------------------------


def _run_python(code):
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_importing_preprocess_does_not_import_the_pipeline():
  _run_python("""
      import sys
      import nfnet_jax.data.preprocess
      loaded = sorted(m for m in sys.modules if m.startswith('nfnet_jax.data'))
      assert 'nfnet_jax.data.pipeline' not in loaded, loaded
      assert 'nfnet_jax.data.augment' not in loaded, loaded
      """)


def test_the_digits_path_does_not_import_tfds():
  _run_python("""
      import sys
      from nfnet_jax import data
      cfg = data.default_data_config()
      data.dataset_info(cfg)
      next(data.train_iterator(cfg, per_device_batch=2, local_devices=1, seed=0))
      next(data.eval_iterator(cfg, split='test', per_device_batch=2, local_devices=1))
      assert 'tensorflow_datasets' not in sys.modules
      assert 'nfnet_jax.data.tfds_source' not in sys.modules
      """)
