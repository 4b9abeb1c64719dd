"""TensorFlow Datasets sources: ImageNet (``imagenet2012``) and any TFDS image dataset.

    data.name = 'imagenet2012'           # TFDS imagenet2012 5.x, with the paper's splits
    data.name = 'tfds:oxford_flowers102'  # any TFDS dataset with an image and a class label
    data.data_dir = 'gs://bucket/tensorflow_datasets'   # or a local path; '' = TFDS default

ImageNet splits (those of DeepMind's released nfnets/dataset.py, which holds out the
first 10,000 training images for validation):
    'train'                = TFDS train (1,281,167 images; final runs)
    'train_minus_minival'  = train[10000:]
    'minival'              = train[:10000]  (model selection without touching validation)
    'validation' / 'test'  = TFDS validation (50,000 images; the number the paper reports)
Other TFDS datasets expose their own splits, and any TFDS split expression
('train[:90%]') may be used as a split name.

Images are read still encoded (``tfds.decode.SkipDecoding``) so that training decodes
only the inception-crop window of each JPEG (``preprocess.train_image``); evaluation
decodes the whole image (``preprocess.eval_crop``). Training reads the files in a new
order each epoch, from a seed the pipeline derives from (seed, epoch), so that a resumed
run can rebuild any epoch's order without replaying the ones before it.

Per-host sharding: process p of n reads ``tfds.even_splits(split, n)[p]`` (contiguous
ranges of the split, sizes within one of each other): every host reads only its own
files, and across hosts each example is read exactly once.

Evaluation-only datasets (``sources.EVAL_DATASETS``, named in ``eval.splits``), labelled
with ImageNet's 1000 classes:
    'imagenet_v2'        TFDS imagenet_v2/matched-frequency, split 'test' (10,000 images;
                         Recht et al. 2019, arXiv 1902.10811)
    'imagenet2012_real'  TFDS imagenet2012_real, split 'validation': the 50,000 validation
                         images with the ReaL labels of Beyer et al. 2020 (arXiv 2006.07159),
                         a set of classes per image, served as the multi-hot 'label_set'

A dataset that is not prepared fails at once with the steps to prepare it
(``DatasetNotPreparedError``), not with a stack trace from inside TFDS.
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Mapping

import ml_collections
import tensorflow as tf

from nfnet_jax.data import preprocess, sources

IMAGENET_SPLITS = {
  'train': 'train',
  'train_minus_minival': 'train[10000:]',
  'minival': 'train[:10000]',
  'validation': 'validation',
  'test': 'validation',
}
IMAGENET_VERSION = '5.*.*'
IMAGENET_V2_VERSION = '3.*.*'
IMAGENET_REAL_VERSION = '1.*.*'


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(WordNet ids, synset words) of the 1000 ImageNet classes, in label order.

  Label order is TFDS imagenet2012's (sorted WordNet ids), which is also the order of the
  released NFNet classifiers. Shipped with the package: no download, no TFDS data.
  """
  text = (
    importlib.resources.files('nfnet_jax.data')
    .joinpath('imagenet_classes.tsv')
    .read_text(encoding='utf-8')
  )
  rows = [line.split('\t') for line in text.splitlines() if line and not line.startswith('#')]
  return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset is not in data_dir; the message says how to prepare it."""


def _tfds():
  # Imported on first use: TFDS takes seconds to import, and a run that does not read a
  # TFDS dataset (digits, folder) never needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _where(data_dir: str) -> str:
  return data_dir or '$TFDS_DATA_DIR (default ~/tensorflow_datasets)'


def imagenet_not_prepared_message(data_dir: str) -> str:
  d = data_dir or '~/tensorflow_datasets'
  return (
    f'ImageNet (TFDS imagenet2012 {IMAGENET_VERSION[0]}.x) is not prepared in '
    f'{_where(data_dir)}. TFDS cannot download ImageNet: (1) get ILSVRC2012_img_train.tar '
    f'and ILSVRC2012_img_val.tar from https://image-net.org (registration needed), '
    f'(2) put both in {d}/downloads/manual/, (3) run `tfds build imagenet2012 '
    f'--data_dir {d}` (about 1 hour, 150 GB), (4) train with '
    f'--config.data.data_dir={d} (or a gs:// copy of it). See docs/imagenet.md.'
  )


def imagenet_v2_not_prepared_message(data_dir: str) -> str:
  d = data_dir or '~/tensorflow_datasets'
  return (
    f'ImageNet-v2 (TFDS imagenet_v2 {IMAGENET_V2_VERSION[0]}.x) is not prepared in '
    f'{_where(data_dir)}. Run `tfds build imagenet_v2/matched-frequency --data_dir {d}` on a '
    'machine with network access (it downloads 1.2 GB, no registration), then pass '
    f'--config.data.data_dir={d}. See docs/imagenet.md.'
  )


def imagenet_real_not_prepared_message(data_dir: str) -> str:
  d = data_dir or '~/tensorflow_datasets'
  return (
    f'ImageNet ReaL (TFDS imagenet2012_real {IMAGENET_REAL_VERSION[0]}.x) is not prepared in '
    f'{_where(data_dir)}. Put ILSVRC2012_img_val.tar (from https://image-net.org) in '
    f'{d}/downloads/manual/, run `tfds build imagenet2012_real --data_dir {d}` on a machine '
    'with network access (it downloads the ReaL labels), then pass '
    f'--config.data.data_dir={d}. See docs/imagenet.md.'
  )


class TfdsSource(sources.DataSource):
  """A ``sources.DataSource`` over a TFDS image-classification dataset."""

  def __init__(
    self,
    tfds_name: str,
    *,
    name: str | None = None,
    split_aliases: Mapping[str, str] | None = None,
    train_split: str = 'train',
    not_prepared_message=None,
    keys: tuple[str, str] | None = None,
    label_set_key: str | None = None,
  ):
    """``keys``: the (Image, ClassLabel) features, where the builder's supervised keys
    are not those; ``label_set_key``: a Sequence(ClassLabel) feature served (for
    evaluation) as the multi-hot 'label_set' of every example."""
    self.tfds_name = tfds_name
    self.name = name or f'tfds:{tfds_name}'
    self.train_split = train_split
    self._aliases = dict(split_aliases or {})
    self._not_prepared = not_prepared_message
    self._explicit_keys = keys
    self._label_set_key = label_set_key

  # -- TFDS access ------------------------------------------------------------------------

  def _builder(self, data_config: ml_collections.ConfigDict):
    tfds = _tfds()
    data_dir = data_config.data_dir or None
    try:
      return tfds.builder(self.tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
        f'{self.name!r}: TFDS has no dataset {self.tfds_name.split(":")[0]!r} ({e}). '
        'See https://www.tensorflow.org/datasets/catalog for names, or use '
        "data.name='folder' for your own images."
      ) from None

  def _not_prepared_error(self, data_config, detail: str) -> DatasetNotPreparedError:
    data_dir = data_config.data_dir or ''
    if self._not_prepared is not None:
      msg = self._not_prepared(data_dir)
    else:
      d = data_dir or '~/tensorflow_datasets'
      msg = (
        f'TFDS dataset {self.tfds_name!r} is not prepared in {_where(data_dir)}. '
        f'Run `tfds build {self.tfds_name} --data_dir {d}` on a machine with network '
        f'access (copy the result to gs:// for a pod), then pass '
        f'--config.data.data_dir={d}.'
      )
    return DatasetNotPreparedError(f'{msg} [TFDS: {detail}]')

  def _tfds_split(self, split: str) -> str:
    return self._aliases.get(split, split)

  def _read(self, data_config, tfds_split, *, shuffle_seed: int | tf.Tensor | None = None):
    """builder.as_dataset with the image still encoded; not-prepared -> our error."""
    tfds = _tfds()
    builder = self._builder(data_config)
    image_key, label_key = self._keys(builder)
    # try_autocache off: caching is data.cache's decision (it warns about host RAM). The
    # file order is a function of the seed alone (no reshuffle on a second pass):
    # train_iterator gives each epoch its own seed, which resuming relies on.
    read_config = tfds.ReadConfig(
      shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False, try_autocache=False
    )
    try:
      ds = builder.as_dataset(
        split=tfds_split,
        shuffle_files=shuffle_seed is not None,
        read_config=read_config,
        decoders={image_key: tfds.decode.SkipDecoding()},
      )
    except AssertionError as e:  # TFDS's "could not find data in ..." when not prepared.
      raise self._not_prepared_error(data_config, str(e).splitlines()[0]) from None
    except (ValueError, KeyError) as e:
      if 'split' in str(e).lower():
        raise ValueError(f'Bad split {tfds_split!r} for {self.name!r}: {e}') from None
      raise
    if self._label_set_key is None:
      return ds.map(lambda ex: {'image': ex[image_key], 'label': ex[label_key]}), builder
    set_key = self._label_set_key
    num_classes = int(builder.info.features[label_key].num_classes)

    def with_label_set(ex):
      # Class ids (any number, possibly none) -> a fixed-shape multi-hot vector.
      ids = tf.cast(ex[set_key], tf.int32)
      hot = tf.math.bincount(ids, minlength=num_classes, maxlength=num_classes) > 0
      hot = tf.ensure_shape(hot, [num_classes])  # static, for batching and padding
      return {'image': ex[image_key], 'label': ex[label_key], 'label_set': hot}

    return ds.map(with_label_set), builder

  def _keys(self, builder) -> tuple[str, str]:
    tfds = _tfds()
    keys = self._explicit_keys or builder.info.supervised_keys
    features = builder.info.features
    if not keys or len(keys) != 2 or not isinstance(keys[0], str):
      image = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
      label = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
      if len(image) != 1 or len(label) != 1:
        raise ValueError(
          f'{self.name!r} is not an image-classification dataset (features: '
          f'{list(features)}): need one Image and one ClassLabel feature.'
        )
      keys = (image[0], label[0])
    image_key, label_key = keys
    if not isinstance(features[image_key], tfds.features.Image) or not isinstance(
      features[label_key], tfds.features.ClassLabel
    ):
      raise ValueError(f'{self.name!r}: supervised keys {keys} are not (Image, ClassLabel).')
    return image_key, label_key

  def _num_examples(self, data_config, tfds_split) -> int:
    builder = self._builder(data_config)
    if builder.info.splits:  # Prepared: the metadata knows, no files are opened.
      try:
        return int(builder.info.splits[tfds_split].num_examples)
      except (KeyError, ValueError) as e:
        raise ValueError(
          f'Bad split {tfds_split!r} for {self.name!r}: {e}. Valid splits: '
          f'{", ".join(self._split_names(builder))}.'
        ) from None
    # No metadata (not prepared, or TFDS mocked in tests): build the dataset, which
    # raises the not-prepared error or knows its cardinality.
    ds, _ = self._read(data_config, tfds_split)
    n = int(ds.cardinality())
    if n < 0:
      raise ValueError(f'{self.name!r}: the size of split {tfds_split!r} is unknown.')
    return n

  def _split_names(self, builder) -> list[str]:
    names = list(self._aliases) or list(builder.info.splits)
    return names

  # -- the DataSource interface -----------------------------------------------------------

  def info(self, data_config: ml_collections.ConfigDict) -> sources.DatasetInfo:
    builder = self._builder(data_config)
    _, label_key = self._keys(builder)
    label = builder.info.features[label_key]
    if builder.info.splits:
      names = self._split_names(builder)
    else:  # Not prepared (-> the clear error below) or mocked.
      names = list(self._aliases) or ['train']
    num_examples = {s: self._num_examples(data_config, self._tfds_split(s)) for s in names}
    return sources.DatasetInfo(
      name=self.name,
      num_classes=int(label.num_classes),
      num_examples=num_examples,
      class_names=tuple(label.names),
    )

  def class_names(self, data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    builder = self._builder(data_config)  # the features are known before the data exists
    return tuple(builder.info.features[self._keys(builder)[1]].names)

  def check_split(self, data_config: ml_collections.ConfigDict, split: str) -> None:
    """Split names are the aliases/TFDS splits, or any TFDS split expression."""
    self._num_examples(data_config, self._tfds_split(split))

  def _process_split(self, split: str, process_index: int, process_count: int):
    tfds_split = self._tfds_split(split)
    if process_count == 1:
      return tfds_split
    return _tfds().even_splits(tfds_split, n=process_count, drop_remainder=False)[process_index]

  def examples(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
    shuffle_seed: int | tf.Tensor | None = None,
  ) -> tuple[tf.data.Dataset, int]:
    ds, _ = self._read(
      data_config,
      self._process_split(split, process_index, process_count),
      shuffle_seed=shuffle_seed,
    )
    # Symbolic (None here) when built inside a tf.data function, as training does.
    n = tf.get_static_value(ds.cardinality())
    return ds, (int(n) if n is not None and n >= 0 else None)

  def shard_size(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
  ) -> int:
    return self._num_examples(data_config, self._process_split(split, process_index, process_count))

  def approx_bytes(self, data_config: ml_collections.ConfigDict, split: str) -> int | None:
    builder = self._builder(data_config)
    try:
      return int(builder.info.splits[self._tfds_split(split)].num_bytes) or None
    except (KeyError, ValueError, TypeError):
      return None

  def preprocess(
    self,
    example: Mapping[str, tf.Tensor],
    data_config: ml_collections.ConfigDict,
    *,
    rng: tf.Tensor | None,
  ) -> dict[str, tf.Tensor]:
    out = preprocess.decoded_image_preprocess(example, data_config, rng=rng)
    if 'label_set' in example:
      out['label_set'] = example['label_set']
    return out


IMAGENET = TfdsSource(
  f'imagenet2012:{IMAGENET_VERSION}',
  name='imagenet2012',
  split_aliases=IMAGENET_SPLITS,
  train_split='train',
  not_prepared_message=imagenet_not_prepared_message,
)


# Evaluation-only datasets (sources.EVAL_DATASETS): the same 1000 classes, in the same
# order (TFDS's imagenet2012 label file), as IMAGENET.
IMAGENET_V2 = TfdsSource(
  f'imagenet_v2/matched-frequency:{IMAGENET_V2_VERSION}',
  name='imagenet_v2',
  split_aliases={'test': 'test'},
  train_split='test',
  not_prepared_message=imagenet_v2_not_prepared_message,
)
IMAGENET_REAL = TfdsSource(
  f'imagenet2012_real:{IMAGENET_REAL_VERSION}',
  name='imagenet2012_real',
  split_aliases={'validation': 'validation'},
  train_split='validation',
  not_prepared_message=imagenet_real_not_prepared_message,
  keys=('image', 'original_label'),
  label_set_key='real_label',
)


@functools.lru_cache(maxsize=None)
def generic_source(tfds_name: str) -> TfdsSource:
  """The source of data.name = 'tfds:<tfds_name>' (one per name)."""
  return TfdsSource(tfds_name)
