"""The dataset interface: what a source provides, the registry of sources, the data config.

A *source* provides this process's shard of a split as a ``tf.data.Dataset`` of raw
examples and turns one example into an image in 0..255 (``DataSource``); ``pipeline``
does the rest, the same for every source. The built-in sources, by ``data_config.name``:

    'digits'        scikit-learn's handwritten digits, embedded (the default; ``digits``)
    'imagenet2012'  TFDS ImageNet 5.x with the paper's splits (``tfds_source``)
    'tfds:<name>'   any TFDS image-classification dataset (``tfds_source``)
    'folder'        the user's own images (``folder``)

Evaluation can also read other datasets labelled with the training dataset's classes
(``EVAL_DATASETS``: ImageNet-v2 and ImageNet ReaL); an *evaluation entry* names either a
split of the training dataset or one of them (``eval_source``).

``default_data_config()`` declares every data field and its default. The public
functions here and in ``pipeline`` accept a config that lacks some fields and fill them
from the defaults (``with_defaults``); everything below them reads the fields directly.

TensorFlow is used for the input pipeline only: ``fileio.hide_gpus_from_tensorflow``
keeps it off the accelerators, which belong to JAX.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  Attributes:
    name: the registry name (``data_config.name``).
    num_classes: number of label classes; labels are 0..num_classes-1.
    num_examples: examples per split, e.g. {'train': 1437, 'test': 360}.
    class_names: human-readable class names, indexed by label.
  """

  name: str
  num_classes: int
  num_examples: dict[str, int]
  class_names: tuple[str, ...]

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.num_examples)


class DataSource(abc.ABC):
  """What a dataset has to provide to be served by ``train_iterator``/``eval_iterator``.

  A source sets ``name`` and implements ``info``, ``examples``, ``shard_size`` and
  ``preprocess``. ``train_split``, ``check_split`` and ``approx_bytes`` have defaults
  that suit a source whose splits are exactly the ones ``info`` lists.

  Every method receives a complete data config (see ``default_data_config``).

  Attributes:
    name: the registry name (``data_config.name``).
    train_split: the split ``train_iterator`` reads unless data_config.train_split is set.
  """

  name: str
  train_split: str = 'train'

  @abc.abstractmethod
  def info(self, data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """The dataset's classes and named splits."""

  @abc.abstractmethod
  def examples(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
    shuffle_seed: int | tf.Tensor | None = None,
  ) -> tuple[tf.data.Dataset, int | None]:
    """This process's disjoint shard of ``split`` and its size.

    The shards of all processes together hold every example of the split exactly once
    and differ in size by at most one, the larger ones first; the size is the one
    ``shard_size`` gives (training positions are computed from it).

    ``shuffle_seed`` (training only) lets a source shuffle at file level; None means a
    fixed order. It is an int or a scalar int64 tensor: ``train_iterator`` builds every
    epoch from this method, inside tf.data's ``flat_map`` with a seed derived from the
    epoch, so use the seed in TensorFlow ops only (``Dataset.shuffle(seed=...,
    reshuffle_each_iteration=False)``), and let the order depend on the seed alone: the
    same seed must give the same order, or resumed training would see other data.
    """

  @abc.abstractmethod
  def shard_size(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
  ) -> int:
    """The size ``examples`` returns, without building the dataset."""

  @abc.abstractmethod
  def preprocess(
    self,
    example: Mapping[str, tf.Tensor],
    data_config: ml_collections.ConfigDict,
    *,
    rng: tf.Tensor | None,
  ) -> dict[str, tf.Tensor]:
    """One raw example -> {'images': float32 [S, S, 3] in 0..255, 'labels': int32 []},
    plus 'label_set' (bool [num_classes], every correct class) for a multi-label
    evaluation set such as ImageNet ReaL.

    ``rng`` is a stateless-random seed (int64 [2]) for training augmentation at
    S = ``data_config.image_size``, or None for evaluation (no randomness) at
    S = ``eval_image_size(data_config)``. Shapes must be static. Normalisation, mixing
    and RandAugment are the pipeline's, not the source's.
    """

  def check_split(self, data_config: ml_collections.ConfigDict, split: str) -> None:
    """Raises ValueError unless ``split`` can be read.

    Asked only about splits that ``info`` does not list. The default accepts none of
    them; a source that reads split expressions (TFDS's 'train[:90%]') overrides it.
    """
    info = self.info(data_config)
    if split not in info.num_examples:
      raise ValueError(
        f'Unknown split {split!r} for dataset {info.name!r}; '
        f'valid splits: {", ".join(info.num_examples)}.'
      )

  def class_names(self, data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``info(data_config).class_names``; a source that knows them without reading its data
    (TFDS: from the builder's features) overrides it, so that evaluating a dataset of other
    classes is refused before asking for the data to be prepared."""
    return self.info(data_config).class_names

  def approx_bytes(self, data_config: ml_collections.ConfigDict, split: str) -> int | None:
    """About how many bytes the raw (encoded) examples of ``split`` take, or None if
    unknown (the default). With data.cache on, the pipeline warns when this process's
    share would not fit in the host's free RAM."""
    del data_config, split
    return None


# ---------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------

# The built-in sources as 'module:attribute' of the source object and, for names
# '<prefix>:<rest>', of a function from <rest> to a source. Each module is imported when
# its source is first asked for: a run imports only the source it reads (a digits run
# never loads the TFDS source), and the source modules, which build on this one, stay
# out of its import graph.
_BUILTIN_SOURCES = {
  'digits': 'nfnet_jax.data.digits:SOURCE',
  'folder': 'nfnet_jax.data.folder:SOURCE',
  'imagenet2012': 'nfnet_jax.data.tfds_source:IMAGENET',
}
_BUILTIN_PREFIXES = {
  'tfds': 'nfnet_jax.data.tfds_source:generic_source',  # 'tfds:oxford_flowers102'
}
_SOURCES: dict[str, DataSource] = {}


def _load(path: str) -> Any:
  module, _, attribute = path.partition(':')
  return getattr(importlib.import_module(module), attribute)


def register_source(source: DataSource) -> DataSource:
  """Makes a source of your own available as ``data_config.name == source.name``."""
  if source.name in _SOURCES or source.name in _BUILTIN_SOURCES:
    raise ValueError(f'A data source named {source.name!r} is already registered.')
  _SOURCES[source.name] = source
  return source


def known_datasets() -> tuple[str, ...]:
  return tuple(sorted(set(_BUILTIN_SOURCES) | set(_SOURCES))) + tuple(
    f'{p}:<name>' for p in sorted(_BUILTIN_PREFIXES)
  )


def get_source(name: str) -> DataSource:
  if name not in _SOURCES and name in _BUILTIN_SOURCES:
    _SOURCES[name] = _load(_BUILTIN_SOURCES[name])
  if name in _SOURCES:
    return _SOURCES[name]
  prefix, sep, rest = str(name).partition(':')
  if sep and prefix in _BUILTIN_PREFIXES and rest:
    factory: Callable[[str], DataSource] = _load(_BUILTIN_PREFIXES[prefix])
    return factory(rest)
  raise ValueError(
    f'Unknown dataset {name!r}; known datasets: {", ".join(known_datasets())} '
    "(e.g. data.name='tfds:oxford_flowers102' for any TFDS image-classification dataset)."
  )


# ---------------------------------------------------------------------------------------
# The data config.
# ---------------------------------------------------------------------------------------


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields every experiment config carries, with their defaults.

  What to read:
    name: registered dataset: 'digits' (embedded, the default), 'imagenet2012' (TFDS),
      'tfds:<name>' (any TFDS image-classification dataset), or 'folder' (your images).
    data_dir: TFDS data_dir (local or gs://); '' = TFDS's default (~/tensorflow_datasets
      or $TFDS_DATA_DIR).
    folder: 'folder' only: root directory of <class>/<image> files, or of split
      directories (train/, val/, ...) holding <class>/<image> files.
    holdout_fraction: 'folder' only: fraction of a train-only folder held out (by a
      hash of the file's path: stable) as the 'holdout' split.
    train_split: the split to train on; '' = the source's default ('train'). For
      ImageNet, 'train_minus_minival' keeps minival for model selection.
  Image sizes and preprocessing:
    image_size: side S of the training images (pixels).
    eval_image_size: side of the evaluation images; 0 = image_size.
    eval_preprocess: 'resize_crop_32' (the NFNet paper's: squash to S+32, centre crop S),
      'crop_resize' (the NF-RegNet/NF-ResNet experiments': centre square of side
      min(H, W) * S / (S+32), resized to S) or 'crop_pct' (timm's: shorter side to
      S / crop_pct, centre crop S).
    crop_pct: for eval_preprocess='crop_pct'.
  Training augmentation (never applied in eval):
    augment: master switch. Per source: digits translate (max_shift); decoded images get
      the inception crop, a flip and a bicubic resize.
    max_shift: digits only; largest random translation, as a fraction of image_size.
    mixup_alpha: > 0: MixUp with Beta(alpha, alpha) on the first half of each
      per-device batch (labels become distributions).
    cutmix: CutMix on the second half of each per-device batch.
    randaug_layers / randaug_magnitude: RandAugment after mixing (0 layers = off).
  tf.data:
    shuffle_buffer: examples per process.
    cache: keep this process's raw (encoded) examples in host RAM after the first epoch;
      a warning is logged when they would not fit.
    num_parallel_calls: parallel map calls; -1 = autotune.
    threadpool_size: a private thread pool of this many threads; 0 = TF's shared pool.
    deterministic: the same seed gives the same batches, and a resumed run (train_iterator's
      start_step) the uninterrupted run's (slightly slower than False).
    skip_corrupt: 'folder' only: skip (with a counted warning) images that do not
      decode instead of stopping with the list of bad files.
  """
  return ml_collections.ConfigDict(
    dict(
      name='digits',
      data_dir='',
      folder='',
      holdout_fraction=0.0,
      train_split='',
      image_size=32,
      eval_image_size=0,
      eval_preprocess='resize_crop_32',
      crop_pct=0.875,
      augment=True,
      max_shift=0.125,
      mixup_alpha=0.0,
      cutmix=False,
      randaug_layers=0,
      randaug_magnitude=0.0,
      shuffle_buffer=10_000,
      cache=False,
      num_parallel_calls=-1,
      threadpool_size=0,
      deterministic=True,
      skip_corrupt=True,
    )
  )


@functools.cache
def _defaults() -> dict[str, Any]:
  return default_data_config().to_dict()


def with_defaults(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``data_config`` itself if it has every field of ``default_data_config()``; else a
  copy with the missing fields set to their defaults."""
  missing = [key for key in _defaults() if key not in data_config]
  if not missing:
    return data_config
  filled = ml_collections.ConfigDict(data_config.to_dict())
  for key in missing:
    filled[key] = _defaults()[key]
  return filled


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  data_config = with_defaults(data_config)
  return get_source(data_config.name).info(data_config)


def train_split(data_config: ml_collections.ConfigDict) -> str:
  """The split ``train_iterator`` reads."""
  data_config = with_defaults(data_config)
  return data_config.train_split or get_source(data_config.name).train_split


def eval_image_size(data_config: ml_collections.ConfigDict) -> int:
  data_config = with_defaults(data_config)
  return int(data_config.eval_image_size or data_config.image_size)


# ---------------------------------------------------------------------------------------
# Evaluation entries: a split of the training dataset, or another dataset of its classes.
# ---------------------------------------------------------------------------------------

# Datasets an evaluation entry may name besides the training dataset's splits:
# name -> ('module:attribute' of the source, the split it reads). 'imagenet_v2' reads the
# whole split, 'imagenet_v2[:1000]' a TFDS slice of it. Preprocessing (eval image size
# and view) is the training data config's.
EVAL_DATASETS = {
  'imagenet_v2': ('nfnet_jax.data.tfds_source:IMAGENET_V2', 'test'),
  'imagenet2012_real': ('nfnet_jax.data.tfds_source:IMAGENET_REAL', 'validation'),
}


def parse_eval_splits(spec: str | Sequence[str]) -> tuple[str, ...]:
  """'validation,imagenet_v2' (or a sequence of entries) -> ('validation', 'imagenet_v2')."""
  entries = tuple(e.strip() for e in (spec.split(',') if isinstance(spec, str) else spec))
  if not entries or not all(entries):
    raise ValueError(
      f'Empty evaluation entry in {spec!r}; give comma-separated splits or datasets, '
      'e.g. validation,imagenet_v2,imagenet2012_real.'
    )
  repeated = sorted({e for e in entries if entries.count(e) > 1})
  if repeated:
    raise ValueError(f'Evaluation entries repeated in {spec!r}: {", ".join(repeated)}.')
  return entries


def eval_source(data_config: ml_collections.ConfigDict, entry: str) -> tuple[DataSource, str]:
  """The source and split that evaluation entry ``entry`` reads: an ``EVAL_DATASETS``
  name (optionally with a TFDS slice, 'imagenet_v2[:1000]'), else a split (or TFDS split
  expression) of the training dataset ``data_config.name``."""
  name, bracket, rest = entry.partition('[')
  if name in EVAL_DATASETS:
    path, split = EVAL_DATASETS[name]
    return _load(path), split + bracket + rest
  return get_source(data_config.name), entry


def check_eval_split(data_config: ml_collections.ConfigDict, entry: str) -> int:
  """Raises ValueError unless evaluation entry ``entry`` can be read and is labelled with
  the training dataset's classes; returns its number of examples."""
  data_config = with_defaults(data_config)
  source, split = eval_source(data_config, entry)
  trained = get_source(data_config.name)
  if source is not trained:
    names, train_names = source.class_names(data_config), trained.class_names(data_config)
    if names != train_names:
      raise ValueError(
        f'Evaluation set {entry!r} is labelled with the {len(names)} classes of '
        f'{source.name!r}, which are not the {len(train_names)} classes of the training '
        f'dataset {trained.name!r}; evaluate it only on models of those classes.'
      )
  validate_split(source, source.info(data_config), split, data_config)
  return source.shard_size(data_config, split, process_index=0, process_count=1)


def validate_split(
  source: DataSource, info: DatasetInfo, split: str, data_config: ml_collections.ConfigDict
) -> None:
  """Raises ValueError unless ``source`` (with ``info``) can read ``split``."""
  if split not in info.num_examples:
    source.check_split(data_config, split)


def split_size(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in ``split`` (a named split or, for TFDS, a split expression; or
  an evaluation entry, see ``eval_source``)."""
  data_config = with_defaults(data_config)
  source, split = eval_source(data_config, split)
  validate_split(source, source.info(data_config), split, data_config)
  return source.shard_size(data_config, split, process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------
# Sharding and TensorFlow's devices.
# ---------------------------------------------------------------------------------------


def even_shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of process ``process_index``'s contiguous shard of n examples.

  Sizes differ by at most one, the larger shards first (as ``tfds.even_splits`` with
  drop_remainder=False distributes them).
  """
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def shard_for_process(
  ds: tf.data.Dataset, process_index: int, process_count: int
) -> tuple[tf.data.Dataset, int | None]:
  """Example i goes to process i % process_count. Returns the shard and its size (None
  where unknown: a dataset of unknown cardinality, or one built inside a tf.data
  function, where the cardinality is symbolic).

  Call it on the unshuffled dataset, before any shuffling.
  """
  n = tf.get_static_value(ds.cardinality())
  size = len(range(process_index, int(n), process_count)) if n is not None and n >= 0 else None
  if process_count > 1:
    ds = ds.shard(process_count, process_index)
  return ds, size
