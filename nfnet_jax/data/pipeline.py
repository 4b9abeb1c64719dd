"""The dataset interface and the tf.data helpers shared by every data source.

Data flows one way: a *source* (digits now; TFDS ImageNet and image folders later)
provides this process's shard of a split as a ``tf.data.Dataset`` of raw examples and
knows how to preprocess one example; this module turns that into batches for the
devices of this process and hands them over as NumPy:

    source.examples  ->  shard (per process)  ->  [train: shuffle -> repeat]
      ->  source.preprocess  ->  [eval: pad + mask]
      ->  batch [local_devices, per_device_batch, ...]  ->  prefetch  ->  NumPy

Every batch is a dict of NumPy arrays:
  'images': float32 [local_devices, per_device_batch, S, S, 3], normalised with the
            ImageNet mean/std (``MEAN_RGB`` / ``STDDEV_RGB``, in 0..255 units);
  'labels': int32   [local_devices, per_device_batch];
  'mask':   float32 [local_devices, per_device_batch] (eval only): 1 for real examples,
            0 for padding.

Sources register themselves with ``register_source``; the public functions look them up
by ``data_config.name``. TensorFlow is used for the input pipeline only: GPUs are hidden
from it before any dataset is built, and nothing here is meant to run inside jitted code.
"""
from __future__ import annotations

import dataclasses
import logging
import math
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
  train_split: str  # The split that ``train_iterator`` reads.

  def info(self, data_config: ml_collections.ConfigDict) -> DatasetInfo:
    ...

  def examples(self, data_config: ml_collections.ConfigDict, split: str, *,
               process_index: int, process_count: int) -> tuple[tf.data.Dataset, int]:
    """This process's disjoint shard of ``split`` (unshuffled) and its size.

    The shards of all processes together hold every example of the split exactly once
    and differ in size by at most one (as ``tf.data.Dataset.shard`` gives).
    """
    ...

  def preprocess(self, example: Mapping[str, tf.Tensor], data_config: ml_collections.ConfigDict,
                 *, rng: tf.Tensor | None) -> dict[str, tf.Tensor]:
    """One raw example -> {'images': float32 [S, S, 3] normalised, 'labels': int32 []}.

    ``rng`` is a stateless-random seed (int64 [2]) for training augmentation, or None for
    evaluation (no randomness). Shapes must be static.
    """
    ...


_SOURCES: dict[str, DataSource] = {}


def register_source(source: DataSource) -> DataSource:
  """Makes ``source`` available as ``data_config.name == source.name``."""
  if source.name in _SOURCES:
    raise ValueError(f'A data source named {source.name!r} is already registered.')
  _SOURCES[source.name] = source
  return source


def known_datasets() -> tuple[str, ...]:
  return tuple(sorted(_SOURCES))


def get_source(name: str) -> DataSource:
  try:
    return _SOURCES[name]
  except KeyError:
    raise ValueError(
        f'Unknown dataset {name!r}; known datasets: {", ".join(known_datasets())}.') from None


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields every experiment config carries, with their defaults.

  Fields:
    name: registered dataset name ('digits').
    image_size: side S of the square images handed to the model (pixels).
    augment: apply training augmentation in ``train_iterator`` (never in eval).
      For digits: a random translation (no flips: digits are not flip-invariant).
    shuffle_buffer: tf.data shuffle buffer (examples per process). Digits fit whole.
    max_shift: digits only; largest random translation, as a fraction of image_size
      (the image is zero-padded by round(max_shift * S) pixels per side and randomly
      cropped back to S x S).
  """
  return ml_collections.ConfigDict(dict(
      name='digits',
      image_size=32,
      augment=True,
      shuffle_buffer=10_000,
      max_shift=0.125,
  ))


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  return get_source(data_config.name).info(data_config)


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


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """RGB image in 0..255 (any float/int dtype) -> float32 normalised with ImageNet stats."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(MEAN_RGB, tf.float32)) / tf.constant(STDDEV_RGB, tf.float32)


def denormalize_image(images: np.ndarray) -> np.ndarray:
  """NumPy inverse of ``normalize_image`` (for tests and visualisation): -> 0..255 float32."""
  return (np.asarray(images, np.float32) * np.asarray(STDDEV_RGB, np.float32)
          + np.asarray(MEAN_RGB, np.float32))


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


def pipeline_options() -> tf.data.Options:
  """Deterministic element order (same seed -> same batches) with parallel maps."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return options


def as_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
  """Hands batches over as NumPy arrays (no tf.Tensor leaves this module)."""
  return ds.as_numpy_iterator()


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def _check_common(data_config, per_device_batch, local_devices, process_index, process_count):
  _check_int('per_device_batch', per_device_batch, 1)
  _check_int('local_devices', local_devices, 1)
  _check_int('process_count', process_count, 1)
  _check_int('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index={process_index} must be < process_count={process_count}.')
  _check_int('data_config.image_size', data_config.image_size, 1)
  source = get_source(data_config.name)
  return source, source.info(data_config)


def _check_split(info: DatasetInfo, split: str) -> None:
  if split not in info.num_examples:
    raise ValueError(f'Unknown split {split!r} for dataset {info.name!r}; '
                     f'valid splits: {", ".join(info.num_examples)}.')


# ---------------------------------------------------------------------------------------
# The public iterators.
# ---------------------------------------------------------------------------------------

def train_iterator(data_config: ml_collections.ConfigDict, *, per_device_batch: int,
                   local_devices: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
  """Infinite, shuffled (reshuffled each epoch), augmented (if ``data_config.augment``)
  training batches of this process's shard of the source's train split.

  Yields {'images': float32 [local_devices, per_device_batch, S, S, 3],
          'labels': int32 [local_devices, per_device_batch]}.
  The same (config, seed, process) gives the same batches; batches may span epochs.
  """
  source, info = _check_common(data_config, per_device_batch, local_devices, process_index,
                               process_count)
  _check_int('data_config.shuffle_buffer', data_config.shuffle_buffer, 1)
  _check_int('seed', seed, 0)
  hide_gpus_from_tensorflow()
  ds, shard_size = source.examples(data_config, source.train_split,
                                   process_index=process_index, process_count=process_count)
  local_batch = per_device_batch * local_devices
  if shard_size is not None and local_batch > shard_size:
    raise ValueError(
        f'A batch of {local_batch} (= local_devices {local_devices} x per_device_batch '
        f'{per_device_batch}) does not fit the {shard_size} training examples of process '
        f'{process_index}/{process_count} in {info.name!r}; use a smaller per_device_batch.')

  ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  augment = bool(data_config.augment)
  if augment:
    # Stateless per-example seeds: deterministic under parallel map, new every epoch.
    base = tf.constant([seed, process_index], tf.int64)
    ds = ds.enumerate().map(
        lambda i, ex: source.preprocess(
            ex, data_config, rng=tf.random.experimental.stateless_fold_in(base, i)),
        num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = ds.map(lambda ex: source.preprocess(ex, data_config, rng=None),
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = batch_for_devices(ds, local_devices=local_devices, per_device_batch=per_device_batch,
                         drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())
  return as_numpy(ds)


def eval_steps(data_config: ml_collections.ConfigDict, *, split: str, per_device_batch: int,
               local_devices: int, process_count: int = 1) -> int:
  """Number of batches ``eval_iterator`` yields; the same on every process."""
  _check_int('per_device_batch', per_device_batch, 1)
  _check_int('local_devices', local_devices, 1)
  _check_int('process_count', process_count, 1)
  info = dataset_info(data_config)
  _check_split(info, split)
  max_shard = math.ceil(info.num_examples[split] / process_count)
  return math.ceil(max_shard / (per_device_batch * local_devices))


def eval_iterator(data_config: ml_collections.ConfigDict, *, split: str, per_device_batch: int,
                  local_devices: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass, in a fixed order and without augmentation, over this process's shard of
  ``split``.

  Yields {'images', 'labels', 'mask'} with leading axes [local_devices, per_device_batch].
  Padding (zero images, label 0, mask 0) fills the last batch and, where shards differ in
  size, extends the shorter shards so that every process yields the same number of batches
  (``eval_steps``): collective eval steps then never hang. Summed over processes, the
  masked examples are exactly the split, each once.
  """
  source, info = _check_common(data_config, per_device_batch, local_devices, process_index,
                               process_count)
  _check_split(info, split)
  hide_gpus_from_tensorflow()
  ds, shard_size = source.examples(data_config, split, process_index=process_index,
                                   process_count=process_count)
  if shard_size is None:
    raise ValueError(f'Source {info.name!r} returned an eval shard of unknown size.')
  steps = eval_steps(data_config, split=split, per_device_batch=per_device_batch,
                     local_devices=local_devices, process_count=process_count)
  ds = ds.map(lambda ex: source.preprocess(ex, data_config, rng=None),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = pad_with_mask(ds, num_real=shard_size,
                     padded_size=steps * per_device_batch * local_devices)
  ds = batch_for_devices(ds, local_devices=local_devices, per_device_batch=per_device_batch,
                         drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())
  return as_numpy(ds)
