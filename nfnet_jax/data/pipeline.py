"""The dataset interface and the tf.data pipeline shared by every data source.

Data flows one way. A *source* (``digits``, ``tfds`` for ImageNet and any TFDS image
dataset, ``folder`` for the user's own images) provides this process's shard of a split as
a ``tf.data.Dataset`` of raw examples and knows how to turn one example into an image in
0..255; this module does the rest, the same for every source:

    source.examples (this process's disjoint shard)  ->  [cache]
      train: shuffle -> repeat -> source.preprocess(rng) -> uint8 -> per-device batches
             -> [MixUp on one half, CutMix on the other (soft labels)]
             -> [RandAugment on each image, batched]
      eval:  source.preprocess(rng=None) -> normalise -> pad + mask
      ->  batch [local_devices, per_device_batch, ...]  ->  prefetch  ->  NumPy

The order is the paper's: RandAugment runs *after* mixing (nfnet-spec section 3).

Every batch is a dict of NumPy arrays:
  'images': training: uint8 [local_devices, per_device_batch, S, S, 3] in 0..255, to be
            normalised on the device (a quarter of float32's host memory traffic and
            host-to-device copy; RandAugment's output is uint8 anyway);
            evaluation: float32, normalised with the ImageNet mean/std (``MEAN_RGB`` /
            ``STDDEV_RGB``, in 0..255 units) on the host, because resize_crop_32 keeps
            the bicubic overshoot beyond 0..255 that the released weights were
            evaluated with;
  'labels': int32   [local_devices, per_device_batch], or float32
            [local_devices, per_device_batch, num_classes] label distributions when
            training with MixUp/CutMix;
  'mask':   float32 [local_devices, per_device_batch] (eval only): 1 for real examples,
            0 for padding.

Sources register themselves with ``register_source``; the public functions look them up
by ``data_config.name``. TensorFlow is used for the input pipeline only: GPUs are hidden
from it before any dataset is built, and nothing here is meant to run inside jitted code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Protocol

import ml_collections
import numpy as np
import tensorflow as tf

# ImageNet normalisation (nfnet-spec section 3), in 0..255 pixel units.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

Batch = dict[str, np.ndarray]


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


class DataSource(Protocol):
  """What a dataset has to provide to be served by ``train_iterator``/``eval_iterator``."""

  name: str
  train_split: str  # The split ``train_iterator`` reads unless data_config.train_split is set.

  def info(self, data_config: ml_collections.ConfigDict) -> DatasetInfo:
    ...

  def examples(self, data_config: ml_collections.ConfigDict, split: str, *,
               process_index: int, process_count: int,
               shuffle_seed: int | None = None) -> tuple[tf.data.Dataset, int]:
    """This process's disjoint shard of ``split`` and its size.

    The shards of all processes together hold every example of the split exactly once
    and differ in size by at most one, the larger ones first. ``shuffle_seed`` (training
    only) lets a source shuffle at file level; None means a fixed order.
    """
    ...

  def shard_size(self, data_config: ml_collections.ConfigDict, split: str, *,
                 process_index: int, process_count: int) -> int:
    """The size ``examples`` returns, without building the dataset."""
    ...

  def preprocess(self, example: Mapping[str, tf.Tensor], data_config: ml_collections.ConfigDict,
                 *, rng: tf.Tensor | None) -> dict[str, tf.Tensor]:
    """One raw example -> {'images': float32 [S, S, 3] in 0..255, 'labels': int32 []}.

    ``rng`` is a stateless-random seed (int64 [2]) for training augmentation at
    S = ``data_config.image_size``, or None for evaluation (no randomness) at
    S = ``eval_image_size(data_config)``. Shapes must be static. Normalisation, mixing
    and RandAugment are the pipeline's, not the source's.
    """
    ...


_SOURCES: dict[str, DataSource] = {}
_SOURCE_FACTORIES: dict[str, Any] = {}


def register_source(source: DataSource) -> DataSource:
  """Makes ``source`` available as ``data_config.name == source.name``."""
  if source.name in _SOURCES:
    raise ValueError(f'A data source named {source.name!r} is already registered.')
  _SOURCES[source.name] = source
  return source


def register_source_prefix(prefix: str, factory) -> None:
  """Names ``'<prefix>:<rest>'`` resolve to ``factory(rest)`` (e.g. 'tfds:cifar10')."""
  if prefix in _SOURCE_FACTORIES:
    raise ValueError(f'A data source prefix {prefix!r} is already registered.')
  _SOURCE_FACTORIES[prefix] = factory


def known_datasets() -> tuple[str, ...]:
  return tuple(sorted(_SOURCES)) + tuple(f'{p}:<name>' for p in sorted(_SOURCE_FACTORIES))


def get_source(name: str) -> DataSource:
  if name in _SOURCES:
    return _SOURCES[name]
  prefix, sep, rest = str(name).partition(':')
  if sep and prefix in _SOURCE_FACTORIES and rest:
    return _SOURCE_FACTORIES[prefix](rest)
  raise ValueError(
      f'Unknown dataset {name!r}; known datasets: {", ".join(known_datasets())} '
      "(e.g. data.name='tfds:oxford_flowers102' for any TFDS image-classification dataset).")


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
    deterministic: the same seed gives the same batches (slightly slower when False).
    skip_corrupt: 'folder' only: skip (with a counted warning) images that do not
      decode instead of stopping with the list of bad files.
  """
  return ml_collections.ConfigDict(dict(
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
  ))


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  return get_source(data_config.name).info(data_config)


def train_split(data_config: ml_collections.ConfigDict) -> str:
  """The split ``train_iterator`` reads."""
  return data_config.get('train_split') or get_source(data_config.name).train_split


def eval_image_size(data_config: ml_collections.ConfigDict) -> int:
  return int(data_config.get('eval_image_size') or data_config.image_size)


# ---------------------------------------------------------------------------------------
# Shared tf.data helpers.
# ---------------------------------------------------------------------------------------

_TF_GPUS_HIDDEN = False


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow off the accelerators so that JAX gets all their memory.

  Idempotent. Must run before TensorFlow initialises its devices; if it is too late, a
  warning is logged when TensorFlow can already see a GPU.
  """
  global _TF_GPUS_HIDDEN
  if _TF_GPUS_HIDDEN:
    return
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow's devices are already initialised.
    if tf.config.get_visible_devices('GPU'):
      logging.warning('TensorFlow was initialised before nfnet_jax.data could hide the GPUs '
                      'from it; it may take accelerator memory that JAX needs.')
  _TF_GPUS_HIDDEN = True


# TensorFlow's CPU kernels for broadcasting arithmetic ([S, S, 3] against [3]) take ~1 ms
# per 256 px image, 40% of the whole evaluation preprocessing; XLA fuses the two ops
# into one pass at a twentieth of that.
@tf.function(jit_compile=True)
def _normalize_float(image: tf.Tensor) -> tf.Tensor:
  return (image - tf.constant(MEAN_RGB, tf.float32)) / tf.constant(STDDEV_RGB, tf.float32)


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """RGB image in 0..255 (any float/int dtype) -> float32 normalised with ImageNet stats."""
  return _normalize_float(tf.cast(image, tf.float32))


def denormalize_image(images: np.ndarray) -> np.ndarray:
  """NumPy inverse of ``normalize_image`` (for tests and visualisation): -> 0..255 float32."""
  return (np.asarray(images, np.float32) * np.asarray(STDDEV_RGB, np.float32)
          + np.asarray(MEAN_RGB, np.float32))


def even_shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of process ``process_index``'s contiguous shard of n examples.

  Sizes differ by at most one, the larger shards first (as ``tfds.even_splits`` with
  drop_remainder=False distributes them).
  """
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def shard_for_process(ds: tf.data.Dataset, process_index: int,
                      process_count: int) -> tuple[tf.data.Dataset, int | None]:
  """Example i goes to process i % process_count. Returns the shard and its size.

  Call it on the unshuffled dataset, before any shuffling.
  """
  n = int(ds.cardinality())
  size = len(range(process_index, n, process_count)) if n >= 0 else None
  if process_count > 1:
    ds = ds.shard(process_count, process_index)
  return ds, size


def batch_for_devices(ds: tf.data.Dataset, *, local_devices: int, per_device_batch: int,
                      drop_remainder: bool = True) -> tf.data.Dataset:
  """Elements -> leading axes [local_devices, per_device_batch]."""
  ds = ds.batch(per_device_batch, drop_remainder=drop_remainder)
  return ds.batch(local_devices, drop_remainder=drop_remainder)


def pad_with_mask(ds: tf.data.Dataset, *, num_real: int, padded_size: int) -> tf.data.Dataset:
  """Adds 'mask' (1.0) to every element and appends zero elements (mask 0.0) up to
  ``padded_size`` elements. Element shapes must be static."""
  if padded_size < num_real:
    raise ValueError(f'padded_size={padded_size} < num_real={num_real}.')
  ds = ds.map(lambda ex: {**ex, 'mask': tf.constant(1.0, tf.float32)})
  if padded_size > num_real:
    def zeros(spec: tf.TensorSpec) -> tf.Tensor:
      if not spec.shape.is_fully_defined():
        raise ValueError(f'Cannot pad elements of unknown shape {spec.shape}.')
      return tf.zeros(spec.shape, spec.dtype)
    pad = tf.data.Dataset.from_tensors(tf.nest.map_structure(zeros, ds.element_spec))
    ds = ds.concatenate(pad.repeat(padded_size - num_real))
  return ds


def pipeline_options(data_config: ml_collections.ConfigDict | None = None) -> tf.data.Options:
  """tf.data threading and determinism from the config (defaults: deterministic)."""
  options = tf.data.Options()
  options.deterministic = bool(data_config.get('deterministic', True)) if data_config else True
  options.threading.max_intra_op_parallelism = 1
  threads = int(data_config.get('threadpool_size', 0)) if data_config else 0
  if threads > 0:
    options.threading.private_threadpool_size = threads
  return options


def _parallel_calls(data_config: ml_collections.ConfigDict) -> int:
  n = int(data_config.get('num_parallel_calls', -1))
  return tf.data.AUTOTUNE if n < 0 else max(n, 1)


def as_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
  """Hands batches over as NumPy arrays (no tf.Tensor leaves this module)."""
  return ds.as_numpy_iterator()


def host_memory_bytes() -> int | None:
  """Memory this host can still give (MemAvailable), or its total RAM; None if unknown."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


def maybe_cache(ds: tf.data.Dataset, data_config: ml_collections.ConfigDict,
                approx_bytes: int | None, what: str) -> tf.data.Dataset:
  """``ds.cache()`` in RAM if data_config.cache, warning when it would not fit.

  Caching ImageNet on every host is the classic way to exhaust host RAM (each host caches
  its own shard only, but 150 GB / hosts is still large): say so before it happens.
  """
  if not data_config.get('cache', False):
    return ds
  available = host_memory_bytes()
  if approx_bytes is not None and available is not None and approx_bytes > 0.8 * available:
    logging.warning(
        'data.cache=True will keep about %.1f GB of %s in RAM, but this host has only '
        '%.1f GB available: the job may run out of memory. Set --config.data.cache=False '
        '(or use more hosts, so that each caches a smaller shard).',
        approx_bytes / 1e9, what, available / 1e9)
  return ds.cache()


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def check_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Catches bad data fields early, with the fix in the message."""
  _check_int('data_config.image_size', data_config.image_size, 1)
  _check_int('data_config.eval_image_size', data_config.get('eval_image_size', 0), 0)
  method = data_config.get('eval_preprocess', 'resize_crop_32')
  if method not in EVAL_METHODS:
    raise ValueError(f'data.eval_preprocess={method!r} is not one of {", ".join(EVAL_METHODS)}.')
  crop_pct = float(data_config.get('crop_pct', 0.875))
  if not 0 < crop_pct <= 1:
    raise ValueError(f'data.crop_pct must be in (0, 1], got {crop_pct}.')
  if float(data_config.get('mixup_alpha', 0.0)) < 0:
    raise ValueError(f'data.mixup_alpha must be >= 0, got {data_config.mixup_alpha}.')
  _check_int('data_config.randaug_layers', data_config.get('randaug_layers', 0), 0)
  if float(data_config.get('randaug_magnitude', 0.0)) < 0:
    raise ValueError('data.randaug_magnitude must be >= 0, got '
                     f'{data_config.randaug_magnitude}.')
  _check_int('data_config.shuffle_buffer', data_config.shuffle_buffer, 1)
  _check_int('data_config.threadpool_size', data_config.get('threadpool_size', 0), 0)


EVAL_METHODS = ('resize_crop_32', 'crop_resize', 'crop_pct')


def _check_common(data_config, per_device_batch, local_devices, process_index, process_count):
  _check_int('per_device_batch', per_device_batch, 1)
  _check_int('local_devices', local_devices, 1)
  _check_int('process_count', process_count, 1)
  _check_int('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index={process_index} must be < process_count={process_count}.')
  check_data_config(data_config)
  source = get_source(data_config.name)
  return source, source.info(data_config)


def _check_split(source: DataSource, info: DatasetInfo, split: str,
                 data_config: ml_collections.ConfigDict) -> None:
  if split in info.num_examples:
    return
  check = getattr(source, 'check_split', None)   # e.g. TFDS split expressions
  if check is None:
    raise ValueError(f'Unknown split {split!r} for dataset {info.name!r}; '
                     f'valid splits: {", ".join(info.num_examples)}.')
  check(data_config, split)


def split_size(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in ``split`` (a named split or, for TFDS, a split expression)."""
  source = get_source(data_config.name)
  _check_split(source, source.info(data_config), split, data_config)
  return source.shard_size(data_config, split, process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------
# The class index kept next to the checkpoints.
# ---------------------------------------------------------------------------------------

CLASS_INDEX_FILE = 'class_index.json'


def check_and_write_class_index(info: DatasetInfo, workdir: str, *,
                                write: bool = True) -> None:
  """Pins label -> class name for a workdir: written on first use, checked on every resume.

  A checkpoint's classifier rows mean nothing without the class order they were trained
  with (an image folder's classes are sorted names: adding a class silently shifts every
  label after it). A workdir whose index differs from the dataset's is refused before
  anything in it changes. Only ``write=True`` (process 0) writes; the write is atomic.
  """
  path = os.path.join(workdir, CLASS_INDEX_FILE)
  record = {'dataset': info.name, 'num_classes': info.num_classes,
            'class_names': list(info.class_names)}
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, 'r') as f:
      try:
        found = json.load(f)
      except ValueError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); restore it from a backup or '
                         'use a new --workdir.') from None
    if found.get('class_names') != record['class_names']:
      old, new = found.get('class_names') or [], record['class_names']
      diff = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b),
                  min(len(old), len(new)))
      raise ValueError(
          f'{workdir} was trained on {found.get("num_classes")} classes of '
          f'{found.get("dataset")!r}, but {info.name!r} now has {info.num_classes} classes '
          f'that differ from label {diff} on ({old[diff:diff + 1]} vs {new[diff:diff + 1]}). '
          'Labels would silently change meaning: restore the dataset\'s classes, or train '
          'in a new --workdir (fine-tune from the old checkpoint to keep its weights).')
    return
  if write:
    tf.io.gfile.makedirs(workdir)
    tmp = path + '.tmp'
    with tf.io.gfile.GFile(tmp, 'w') as f:
      json.dump(record, f, indent=1)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_class_index(workdir: str) -> list[str]:
  """The class names (by label) a workdir was trained with."""
  with tf.io.gfile.GFile(os.path.join(workdir, CLASS_INDEX_FILE), 'r') as f:
    return list(json.load(f)['class_names'])


# ---------------------------------------------------------------------------------------
# Batch-level training augmentation (after per-example preprocessing).
# ---------------------------------------------------------------------------------------

def _stage_seed(seed: int, process_index: int, stage: int) -> tf.Tensor:
  """Independent stateless seeds per pipeline stage and process."""
  return tf.random.experimental.stateless_fold_in(
      tf.constant([seed, process_index], tf.int64), stage)


def to_uint8(images: tf.Tensor) -> tf.Tensor:
  """0..255 floats -> uint8 pixels (rounded half to even, bicubic overshoot clipped)."""
  if images.dtype == tf.uint8:
    return images
  # Not under XLA: per image, its launch costs more than the two passes it would save.
  return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def augment_batch(batch: Mapping[str, tf.Tensor], seed: tf.Tensor,
                  data_config: ml_collections.ConfigDict, *,
                  num_classes: int) -> dict[str, tf.Tensor]:
  """One per-device batch of uint8 images: MixUp/CutMix, then RandAugment (the paper's
  order), back to uint8. Labels become distributions when mixing is on."""
  images, labels = batch['images'], batch['labels']
  alpha = float(data_config.get('mixup_alpha', 0.0))
  seed_mix, seed_ra = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if alpha > 0 or bool(data_config.get('cutmix', False)):
    from nfnet_jax.data import mixing  # pylint: disable=g-import-not-at-top
    # Mixing partners come from the same device batch, as in the paper's pipeline.
    images, labels = mixing.mixup_cutmix(
        images, mixing.one_hot(labels, num_classes), seed_mix, alpha=alpha,
        cutmix=bool(data_config.cutmix))
  layers = int(data_config.get('randaug_layers', 0))
  if layers > 0:
    from nfnet_jax.data import randaugment  # pylint: disable=g-import-not-at-top
    # RandAugment's ops (posterize, equalize, ...) are defined on uint8 pixels.
    seeds = tf.random.experimental.stateless_split(seed_ra, tf.shape(images)[0])
    images = randaugment.randaugment_batch(
        images, seeds, num_layers=layers, magnitude=float(data_config.randaug_magnitude))
  return {'images': images, 'labels': labels}


def _batch_augmentation_on(data_config: ml_collections.ConfigDict) -> bool:
  return (float(data_config.get('mixup_alpha', 0.0)) > 0
          or bool(data_config.get('cutmix', False))
          or int(data_config.get('randaug_layers', 0)) > 0)


def _normalize(ex):
  return {**ex, 'images': normalize_image(ex['images'])}


# ---------------------------------------------------------------------------------------
# The public iterators.
# ---------------------------------------------------------------------------------------

def train_iterator(data_config: ml_collections.ConfigDict, *, per_device_batch: int,
                   local_devices: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
  """Infinite, shuffled (reshuffled each epoch), augmented (if ``data_config.augment``)
  training batches of this process's shard of the train split.

  Yields {'images': uint8 [local_devices, per_device_batch, S, S, 3] in 0..255, NOT
                    normalised (``normalize_on_device`` in the train step does it),
          'labels': int32 [local_devices, per_device_batch] (float32 [..., num_classes]
                    label distributions when MixUp/CutMix is on)}.
  With data_config.deterministic, the same (config, seed, process) gives the same
  batches; batches may span epochs.
  """
  source, info = _check_common(data_config, per_device_batch, local_devices, process_index,
                               process_count)
  _check_int('seed', seed, 0)
  split = train_split(data_config)
  _check_split(source, info, split, data_config)
  hide_gpus_from_tensorflow()
  ds, shard_size = source.examples(data_config, split, process_index=process_index,
                                   process_count=process_count, shuffle_seed=seed)
  local_batch = per_device_batch * local_devices
  if shard_size is not None and local_batch > shard_size:
    raise ValueError(
        f'A batch of {local_batch} (= local_devices {local_devices} x per_device_batch '
        f'{per_device_batch}) does not fit the {shard_size} training examples of process '
        f'{process_index}/{process_count} in {info.name!r}; use a smaller per_device_batch.')
  ds = maybe_cache(ds, data_config, _approx_bytes(source, data_config, split, process_count),
                   f'the {split!r} split of {info.name!r}')
  ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  calls = _parallel_calls(data_config)
  base = _stage_seed(seed, process_index, 0)
  # Without augmentation the training images are the evaluation ones at train size.
  train_view = ml_collections.ConfigDict(data_config.to_dict())
  train_view.eval_image_size = int(data_config.image_size)

  def preprocess(i, example):
    # Stateless per-example seeds: deterministic under parallel map, new every epoch.
    rng = (tf.random.experimental.stateless_fold_in(base, i) if data_config.augment
           else None)
    out = source.preprocess(example, data_config if rng is not None else train_view, rng=rng)
    # uint8 from here on: a quarter of float32's memory traffic and host-to-device
    # copy (the train step normalises on the device).
    return {**out, 'images': to_uint8(out['images'])}

  ds = ds.enumerate().map(preprocess, num_parallel_calls=calls)
  ds = ds.batch(per_device_batch, drop_remainder=True)
  if data_config.augment and _batch_augmentation_on(data_config):
    base = _stage_seed(seed, process_index, 1)
    ds = ds.enumerate().map(
        lambda i, batch: augment_batch(batch, tf.random.experimental.stateless_fold_in(base, i),
                                       data_config, num_classes=info.num_classes),
        num_parallel_calls=calls)
  ds = ds.batch(local_devices, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options(data_config))
  return as_numpy(ds)


def _approx_bytes(source, data_config, split, process_count) -> int | None:
  fn = getattr(source, 'approx_bytes', None)
  if fn is None:
    return None
  total = fn(data_config, split)
  return None if total is None else int(math.ceil(total / process_count))


def eval_steps(data_config: ml_collections.ConfigDict, *, split: str, per_device_batch: int,
               local_devices: int, process_count: int = 1) -> int:
  """Number of batches ``eval_iterator`` yields; the same on every process."""
  _check_int('per_device_batch', per_device_batch, 1)
  _check_int('local_devices', local_devices, 1)
  _check_int('process_count', process_count, 1)
  source = get_source(data_config.name)
  _check_split(source, source.info(data_config), split, data_config)
  max_shard = max(source.shard_size(data_config, split, process_index=p,
                                    process_count=process_count)
                  for p in range(process_count))
  return max(1, math.ceil(max_shard / (per_device_batch * local_devices)))


def eval_iterator(data_config: ml_collections.ConfigDict, *, split: str, per_device_batch: int,
                  local_devices: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass, in a fixed order and without augmentation, over this process's shard of
  ``split``, at ``eval_image_size(data_config)`` with ``data_config.eval_preprocess``.

  Yields {'images', 'labels', 'mask'} with leading axes [local_devices, per_device_batch].
  Padding (zero images, label 0, mask 0) fills the last batch and, where shards differ in
  size, extends the shorter shards so that every process yields the same number of batches
  (``eval_steps``): collective eval steps then never hang. Summed over processes, the
  masked examples are exactly the split, each once.
  """
  source, info = _check_common(data_config, per_device_batch, local_devices, process_index,
                               process_count)
  _check_split(source, info, split, data_config)
  hide_gpus_from_tensorflow()
  ds, shard_size = source.examples(data_config, split, process_index=process_index,
                                   process_count=process_count)
  if shard_size is None:
    raise ValueError(f'Source {info.name!r} returned an eval shard of unknown size.')
  steps = eval_steps(data_config, split=split, per_device_batch=per_device_batch,
                     local_devices=local_devices, process_count=process_count)
  calls = _parallel_calls(data_config)
  ds = ds.map(lambda ex: _normalize(source.preprocess(ex, data_config, rng=None)),
              num_parallel_calls=calls)
  ds = pad_with_mask(ds, num_real=shard_size,
                     padded_size=steps * per_device_batch * local_devices)
  ds = batch_for_devices(ds, local_devices=local_devices, per_device_batch=per_device_batch,
                         drop_remainder=True)
  # Evaluation order must not depend on thread timing: always deterministic.
  options = pipeline_options(data_config)
  options.deterministic = True
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(options)
  return as_numpy(ds)
