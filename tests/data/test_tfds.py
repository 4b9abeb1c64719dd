"""TFDS sources: ImageNet under tfds.testing.mock_data, and a real (tiny) TFDS dataset
built offline in a temporary data_dir for the generic path, the per-host sharding and
resuming the training stream."""

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nfnet_jax import data
from nfnet_jax.data import tfds_source
from tests.data.helpers import (
  MIX_AND_RANDAUGMENT,
  assert_resumes_exactly,
  data_config,
  resume_point,
)

NUM_TINY_CLASSES = 23


class NfnetTinyImages(tfds.core.GeneratorBasedBuilder):
  """23 train images (one per class) and 11 test images: JPEGs of odd sizes."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(
            names=[f'class{i:02d}' for i in range(NUM_TINY_CLASSES)]
          ),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      'train': self._generate_examples(0, NUM_TINY_CLASSES),
      'test': self._generate_examples(1000, 11),
    }

  def _generate_examples(self, offset, n):
    rng = np.random.default_rng(offset)
    for i in range(n):
      image = rng.integers(0, 256, (20 + i, 31 - i // 2, 3), np.uint8)
      yield offset + i, {'image': image, 'label': i}


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('nfnet_tiny_images', data_dir=data_dir).download_and_prepare()
  return data_dir


def _imagenet_config(**overrides):
  return data_config(
    name='imagenet2012',
    image_size=24,
    eval_image_size=32,
    mixup_alpha=0.2,
    cutmix=True,
    randaug_layers=2,
    randaug_magnitude=10.0,
    shuffle_buffer=8,
    **overrides,
  )


# ---------------------------------------------------------------------------------------
# ImageNet (mocked: no download).
# ---------------------------------------------------------------------------------------


def test_imagenet_train_batches_under_mock_data():
  with tfds.testing.mock_data(num_examples=16):
    cfg = _imagenet_config()
    info = data.dataset_info(cfg)
    assert info.num_classes == 1000 and info.class_names[0] == 'n01440764'
    assert set(info.num_examples) == {
      'train',
      'train_minus_minival',
      'minival',
      'validation',
      'test',
    }
    first = []
    for _ in range(2):  # the same seed twice: the same batches
      it = data.train_iterator(cfg, per_device_batch=4, local_devices=2, seed=3)
      first.append([next(it) for _ in range(2)])
  for batch in first[0]:
    images, labels = batch['images'], batch['labels']
    assert images.shape == (2, 4, 24, 24, 3) and images.dtype == np.uint8
    assert images.std() > 10  # real pixels, not a constant
    # MixUp/CutMix: label distributions over 1000 classes, each summing to 1, from at
    # most two classes.
    assert labels.shape == (2, 4, 1000) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-5)
    assert labels.min() >= 0 and np.all((labels > 0).sum(-1) <= 2)
  for a, b in zip(*first, strict=True):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_imagenet_eval_batches_under_mock_data():
  with tfds.testing.mock_data(num_examples=10):
    cfg = _imagenet_config()
    for split in ('validation', 'minival'):
      batches = list(data.eval_iterator(cfg, split=split, per_device_batch=4, local_devices=2))
      assert len(batches) == 2
      for b in batches:
        assert b['images'].shape == (2, 4, 32, 32, 3) and b['images'].dtype == np.float32
        assert b['labels'].dtype == np.int32 and b['labels'].shape == (2, 4)
        assert np.all((0 <= b['labels']) & (b['labels'] < 1000))
      assert sum(b['mask'].sum() for b in batches) == 10


def test_imagenet_not_prepared_fails_at_once_with_the_steps(tmp_path):
  cfg = _imagenet_config(data_dir=str(tmp_path))
  for call in (
    lambda: data.dataset_info(cfg),
    lambda: data.train_iterator(cfg, per_device_batch=2, local_devices=1, seed=0),
  ):
    with pytest.raises(tfds_source.DatasetNotPreparedError) as e:
      call()
    msg = str(e.value)
    assert f'{tmp_path}/downloads/manual/' in msg
    assert f'tfds build imagenet2012 --data_dir {tmp_path}' in msg
    assert 'ILSVRC2012_img_train.tar' in msg and 'docs/imagenet.md' in msg
  assert issubclass(tfds_source.DatasetNotPreparedError, FileNotFoundError)


def test_unknown_tfds_dataset_and_unknown_source():
  with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
    data.dataset_info(data_config(name='tfds:no_such_dataset_xyz'))
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'.*tfds:<name>"):
    data.dataset_info(data_config(name='imagenet'))


# ---------------------------------------------------------------------------------------
# A real TFDS dataset: the generic path and the sharding.
# ---------------------------------------------------------------------------------------


def test_generic_tfds_info_and_split_expressions(tiny_dir):
  cfg = data_config(name='tfds:nfnet_tiny_images', data_dir=tiny_dir, image_size=16)
  info = data.dataset_info(cfg)
  assert info.num_classes == NUM_TINY_CLASSES and info.class_names[5] == 'class05'
  assert info.num_examples == {'train': 23, 'test': 11}
  builder = tfds.builder('nfnet_tiny_images', data_dir=tiny_dir)
  expected = builder.info.splits['train[:50%]'].num_examples
  assert data.split_size(cfg, 'train[:50%]') == expected
  batches = list(data.eval_iterator(cfg, split='train[:50%]', per_device_batch=4, local_devices=1))
  assert sum(b['mask'].sum() for b in batches) == expected
  with pytest.raises(ValueError, match="Bad split 'validation'"):
    data.split_size(cfg, 'validation')


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_generic_tfds_eval_counts_every_example_once_across_processes(tiny_dir, process_count):
  cfg = data_config(name='tfds:nfnet_tiny_images', data_dir=tiny_dir, image_size=16)
  for split, n in (('train', 23), ('test', 11)):
    steps = data.eval_steps(
      cfg, split=split, per_device_batch=2, local_devices=2, process_count=process_count
    )
    labels = collections.Counter()
    for p in range(process_count):
      batches = list(
        data.eval_iterator(
          cfg,
          split=split,
          per_device_batch=2,
          local_devices=2,
          process_index=p,
          process_count=process_count,
        )
      )
      assert len(batches) == steps
      for b in batches:
        labels.update(b['labels'].reshape(-1)[b['mask'].reshape(-1) == 1].tolist())
    assert labels == collections.Counter(range(n))  # each image has its own label


def test_generic_tfds_training_shards_are_disjoint_and_cover_the_split(tiny_dir):
  cfg = data_config(name='tfds:nfnet_tiny_images', data_dir=tiny_dir, image_size=16)
  source = data.get_source(cfg.name)
  seen = []
  for p in range(3):
    ds, size = source.examples(cfg, 'train', process_index=p, process_count=3, shuffle_seed=0)
    labels = [int(ex['label']) for ex in ds.as_numpy_iterator()]
    assert len(labels) == size
    seen += labels
  assert sorted(seen) == list(range(23))
  # Training batches are augmented train-size images with integer labels (no mixing).
  b = next(
    data.train_iterator(
      cfg, per_device_batch=3, local_devices=2, seed=0, process_index=1, process_count=3
    )
  )
  assert b['images'].shape == (2, 3, 16, 16, 3) and b['images'].dtype == np.uint8
  assert b['labels'].dtype == np.int32 and b['labels'].shape == (2, 3)


@pytest.mark.parametrize('process_index, shard', [(0, 12), (1, 11)])
@pytest.mark.parametrize('augment', [dict(augment=False), MIX_AND_RANDAUGMENT])
def test_generic_tfds_training_resumes_exactly_across_epochs(
  tiny_dir, process_index, shard, augment
):
  cfg = data_config(
    name='tfds:nfnet_tiny_images', data_dir=tiny_dir, image_size=16, shuffle_buffer=5, **augment
  )
  assert_resumes_exactly(
    cfg,
    (resume_point(shard, 5),),
    per_device_batch=5,
    local_devices=1,
    seed=7,
    process_index=process_index,
    process_count=2,
  )


def test_generic_tfds_epochs_are_new_orders(tiny_dir):
  cfg = data_config(name='tfds:nfnet_tiny_images', data_dir=tiny_dir, image_size=16, augment=False)
  it = data.train_iterator(cfg, per_device_batch=23, local_devices=1, seed=0)
  epochs = [next(it)['labels'][0] for _ in range(3)]  # each image has its own label
  for labels in epochs:
    assert sorted(labels.tolist()) == list(range(23))
  assert epochs[0].tolist() != epochs[1].tolist() != epochs[2].tolist()
