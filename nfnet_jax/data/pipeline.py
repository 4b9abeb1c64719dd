"""The tf.data pipeline shared by every data source: the train and eval iterators.

Data flows one way. A *source* (``sources.DataSource``: ``digits``, ``tfds_source`` for
ImageNet and any TFDS image dataset, ``folder`` for the user's own images) provides this
process's shard of a split as a ``tf.data.Dataset`` of raw examples and knows how to turn
one example into an image in 0..255; this module does the rest, the same for every source:

    train: for epoch e = start_epoch, start_epoch + 1, ...:
             source.examples (this process's disjoint shard, files shuffled with a seed
             of (seed, e)) or the [cache] of one such pass -> shuffle buffer (seed of
             (seed, e))
           -> skip the raw examples of the current epoch already consumed
           -> source.preprocess(rng of the example's position) -> uint8
           -> per-device batches
           -> [MixUp on one half, CutMix on the other (soft labels)]
           -> [RandAugment on each image, batched] (rng of the batch's position)
    eval:  source.examples (this process's shard) -> source.preprocess(rng=None)
           -> normalise -> pad + mask
    ->  batch [local_devices, per_device_batch, ...]  ->  prefetch  ->  NumPy

The order is the paper's: RandAugment runs *after* mixing (arXiv 2102.06171 section 3).

Training is resumable exactly: each step consumes per_device_batch * local_devices
examples, so step k starts at a known position (epoch, offset); every epoch's order and
every random draw is a function of the seed and of positions only, never of how many
elements this iterator has produced. ``train_iterator(start_step=k)`` therefore starts at
epoch k * batch // shard_size without touching the epochs before it, drops the rest of
the offset as raw (undecoded) records, and continues bit for bit as the uninterrupted
stream would (with data.deterministic; see ``train_iterator``).

Every batch is a dict of NumPy arrays:
  'images': training: uint8 [local_devices, per_device_batch, S, S, 3] in 0..255, to be
            normalised on the device (a quarter of float32's host memory traffic and
            host-to-device copy; RandAugment's output is uint8 anyway);
            evaluation: float32, normalised with the ImageNet mean/std
            (``preprocess.MEAN_RGB`` / ``STDDEV_RGB``, in 0..255 units) on the host,
            because resize_crop_32 keeps the bicubic overshoot beyond 0..255 that the
            released weights were evaluated with;
  'labels': int32   [local_devices, per_device_batch], or float32
            [local_devices, per_device_batch, num_classes] label distributions when
            training with MixUp/CutMix;
  'mask':   float32 [local_devices, per_device_batch] (eval only): 1 for real examples,
            0 for padding;
  'label_set': bool [local_devices, per_device_batch, num_classes] (eval of a multi-label
            set only, ImageNet ReaL): every class that counts as correct ('labels' is
            then the original single label); an example may have none.

The iterators look the source up by ``data_config.name`` and fill the fields a config
lacks from ``sources.default_data_config()``. Nothing here is meant to run inside jitted
code.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Iterator, Mapping

import ml_collections
import numpy as np
import tensorflow as tf

from nfnet_jax import fileio
from nfnet_jax.data import preprocess, sources
from nfnet_jax.data.augment import mixing, randaugment

Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------
# tf.data helpers.
# ---------------------------------------------------------------------------------------


def batch_for_devices(
  ds: tf.data.Dataset, *, local_devices: int, per_device_batch: int, drop_remainder: bool = True
) -> tf.data.Dataset:
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
  options.deterministic = bool(data_config.deterministic) if data_config else True
  options.threading.max_intra_op_parallelism = 1
  threads = int(data_config.threadpool_size) if data_config else 0
  if threads > 0:
    options.threading.private_threadpool_size = threads
  return options


def _parallel_calls(data_config: ml_collections.ConfigDict) -> int:
  n = int(data_config.num_parallel_calls)
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


def maybe_cache(
  ds: tf.data.Dataset, data_config: ml_collections.ConfigDict, approx_bytes: int | None, what: str
) -> tf.data.Dataset:
  """``ds.cache()`` in RAM if data_config.cache, warning when it would not fit.

  Caching ImageNet on every host is the classic way to exhaust host RAM (each host caches
  its own shard only, but 150 GB / hosts is still large): say so before it happens.
  """
  if not data_config.cache:
    return ds
  available = host_memory_bytes()
  if approx_bytes is not None and available is not None and approx_bytes > 0.8 * available:
    logging.warning(
      'data.cache=True will keep about %.1f GB of %s in RAM, but this host has only '
      '%.1f GB available: the job may run out of memory. Set --config.data.cache=False '
      '(or use more hosts, so that each caches a smaller shard).',
      approx_bytes / 1e9,
      what,
      available / 1e9,
    )
  return ds.cache()


# ---------------------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def check_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Catches bad data fields early, with the fix in the message."""
  data_config = sources.with_defaults(data_config)
  _check_int('data_config.image_size', data_config.image_size, 1)
  _check_int('data_config.eval_image_size', data_config.eval_image_size, 0)
  method = data_config.eval_preprocess
  if method not in preprocess.EVAL_METHODS:
    raise ValueError(
      f'data.eval_preprocess={method!r} is not one of {", ".join(preprocess.EVAL_METHODS)}.'
    )
  crop_pct = float(data_config.crop_pct)
  if not 0 < crop_pct <= 1:
    raise ValueError(f'data.crop_pct must be in (0, 1], got {crop_pct}.')
  if float(data_config.mixup_alpha) < 0:
    raise ValueError(f'data.mixup_alpha must be >= 0, got {data_config.mixup_alpha}.')
  _check_int('data_config.randaug_layers', data_config.randaug_layers, 0)
  if float(data_config.randaug_magnitude) < 0:
    raise ValueError(f'data.randaug_magnitude must be >= 0, got {data_config.randaug_magnitude}.')
  _check_int('data_config.shuffle_buffer', data_config.shuffle_buffer, 1)
  _check_int('data_config.threadpool_size', data_config.threadpool_size, 0)


def _check_common(data_config, per_device_batch, local_devices, process_index, process_count):
  _check_int('per_device_batch', per_device_batch, 1)
  _check_int('local_devices', local_devices, 1)
  _check_int('process_count', process_count, 1)
  _check_int('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index={process_index} must be < process_count={process_count}.')
  check_data_config(data_config)
  source = sources.get_source(data_config.name)
  return source, source.info(data_config)


# ---------------------------------------------------------------------------------------
# Batch-level training augmentation (after per-example preprocessing).
# ---------------------------------------------------------------------------------------


def _stage_seed(seed: int, process_index: int, stage: int) -> tf.Tensor:
  """Independent stateless seeds per pipeline stage and process."""
  return tf.random.experimental.stateless_fold_in(
    tf.constant([seed, process_index], tf.int64), stage
  )


def to_uint8(images: tf.Tensor) -> tf.Tensor:
  """0..255 floats -> uint8 pixels (rounded half to even, bicubic overshoot clipped)."""
  if images.dtype == tf.uint8:
    return images
  # Not under XLA: per image, its launch costs more than the two passes it would save.
  return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def augment_batch(
  batch: Mapping[str, tf.Tensor],
  seed: tf.Tensor,
  data_config: ml_collections.ConfigDict,
  *,
  num_classes: int,
) -> dict[str, tf.Tensor]:
  """One per-device batch of uint8 images: MixUp/CutMix, then RandAugment (the paper's
  order), back to uint8. Labels become distributions when mixing is on."""
  images, labels = batch['images'], batch['labels']
  alpha = float(data_config.mixup_alpha)
  seed_mix, seed_ra = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if alpha > 0 or bool(data_config.cutmix):
    # Mixing partners come from the same device batch, as in the paper's pipeline.
    images, labels = mixing.mixup_cutmix(
      images,
      mixing.one_hot(labels, num_classes),
      seed_mix,
      alpha=alpha,
      cutmix=bool(data_config.cutmix),
    )
  layers = int(data_config.randaug_layers)
  if layers > 0:
    # RandAugment's ops (posterize, equalize, ...) are defined on uint8 pixels.
    seeds = tf.random.experimental.stateless_split(seed_ra, tf.shape(images)[0])
    images = randaugment.randaugment_batch(
      images, seeds, num_layers=layers, magnitude=float(data_config.randaug_magnitude)
    )
  return {'images': images, 'labels': labels}


def _batch_augmentation_on(data_config: ml_collections.ConfigDict) -> bool:
  return (
    float(data_config.mixup_alpha) > 0
    or bool(data_config.cutmix)
    or int(data_config.randaug_layers) > 0
  )


def _normalize(ex):
  return {**ex, 'images': preprocess.normalize_image(ex['images'])}


# ---------------------------------------------------------------------------------------
# Epochs: the training order as a function of (seed, process, epoch).
# ---------------------------------------------------------------------------------------


# Stages of ``_stage_seed``: independent random streams per use.
_EXAMPLE_STAGE, _BATCH_STAGE, _FILE_ORDER_STAGE, _EXAMPLE_ORDER_STAGE = 0, 1, 2, 3


def _epoch_seed(seed: int, process_index: int, stage: int, epoch: tf.Tensor | int) -> tf.Tensor:
  """A scalar int64 shuffle seed that is a function of (seed, process, stage, epoch)."""
  key = tf.random.experimental.stateless_fold_in(
    _stage_seed(seed, process_index, stage), tf.cast(epoch, tf.int64)
  )
  # stateless_fold_in returns [f(key), epoch]: hash both into the one scalar that
  # Dataset.shuffle takes, so that every epoch gets its own order.
  return tf.random.stateless_uniform([], seed=key, minval=None, maxval=None, dtype=tf.int64)


def _source_examples(
  source: sources.DataSource,
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  process_index: int,
  process_count: int,
  shuffle_seed: tf.Tensor,
  shard_size: int,
) -> tf.data.Dataset:
  """``source.examples`` for training, checked against ``source.shard_size``: resuming
  computes positions from the shard size, so the two must agree."""
  ds, size = source.examples(
    data_config,
    split,
    process_index=process_index,
    process_count=process_count,
    shuffle_seed=shuffle_seed,
  )
  if size is not None and size != shard_size:
    raise ValueError(
      f'Source {source.name!r}: examples() returned a shard of {size} examples but '
      f'shard_size() says {shard_size} (split {split!r}, process {process_index}/'
      f'{process_count}); make the two agree.'
    )
  # Fails the epoch loudly, rather than drifting off the resumable positions, if the
  # source yields another number of examples than it declared.
  return ds.apply(tf.data.experimental.assert_cardinality(shard_size))


def _raw_epochs(
  source: sources.DataSource,
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  seed: int,
  start_epoch: int,
  shard_size: int,
  process_index: int,
  process_count: int,
  what: str,
) -> tf.data.Dataset:
  """Raw (undecoded) examples of epochs start_epoch, start_epoch + 1, ... in a row.

  Epoch e is this process's shard in an order that depends on (seed, process, e) only:
  the source's file-level shuffle and then the shuffle buffer, both seeded per epoch. So
  an epoch can be built without replaying the ones before it, and each is a new order.
  """
  buffer = int(data_config.shuffle_buffer)
  examples = functools.partial(
    _source_examples,
    source,
    data_config,
    split,
    process_index=process_index,
    process_count=process_count,
    shard_size=shard_size,
  )
  if data_config.cache:
    # One pass of the source fills the cache (in epoch 0's file order); every epoch then
    # reshuffles the cached raw examples with the buffer.
    cached = maybe_cache(
      examples(shuffle_seed=_epoch_seed(seed, process_index, _FILE_ORDER_STAGE, 0)),
      data_config,
      _approx_bytes(source, data_config, split, process_count),
      what,
    )

    def epoch_examples(epoch):
      return cached
  else:

    def epoch_examples(epoch):
      return examples(shuffle_seed=_epoch_seed(seed, process_index, _FILE_ORDER_STAGE, epoch))

  # Traced once, as graph code: the sources' Python (TFDS's reader included) must not be
  # rewritten by AutoGraph.
  @tf.autograph.experimental.do_not_convert
  def epoch_dataset(epoch):
    return epoch_examples(epoch).shuffle(
      buffer,
      seed=_epoch_seed(seed, process_index, _EXAMPLE_ORDER_STAGE, epoch),
      reshuffle_each_iteration=False,
    )

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_dataset)


# ---------------------------------------------------------------------------------------
# The public iterators.
# ---------------------------------------------------------------------------------------


def train_iterator(
  data_config: ml_collections.ConfigDict,
  *,
  per_device_batch: int,
  local_devices: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Infinite, shuffled (a new order each epoch), augmented (if ``data_config.augment``)
  training batches of this process's shard of the train split, from step ``start_step``.

  Yields {'images': uint8 [local_devices, per_device_batch, S, S, 3] in 0..255, NOT
                    normalised (``steps.model_inputs`` does it on the device),
          'labels': int32 [local_devices, per_device_batch] (float32 [..., num_classes]
                    label distributions when MixUp/CutMix is on)}.

  The stream is a function of (data config, seed, process_index, process_count,
  per_device_batch * local_devices): each step consumes the next per_device_batch *
  local_devices examples of this process's shard, epoch after epoch (batches may span
  two epochs), and epoch e's order depends on (seed, process, e) only.

  Resuming: with ``data_config.deterministic`` (the default), the batches yielded for
  ``start_step=k`` are bit-identical to batches k+1, k+2, ... of ``start_step=0`` with
  the same other arguments, augmentation included. That exactness needs the same batch
  size per process, process count, seed and data config (and the same files) as the run
  being resumed; with another batch size the same step is another position in the data.
  Whole epochs are skipped arithmetically; inside the current epoch only raw records are
  read and dropped, before decoding, so resuming costs at most one epoch of reading.
  With ``data_config.deterministic=False`` the order depends on thread timing, so a
  resumed run only approximately continues where the interrupted one stopped.
  """
  data_config = sources.with_defaults(data_config)
  source, info = _check_common(
    data_config, per_device_batch, local_devices, process_index, process_count
  )
  _check_int('seed', seed, 0)
  _check_int('start_step', start_step, 0)
  start_step = int(start_step)
  split = sources.train_split(data_config)
  sources.validate_split(source, info, split, data_config)
  fileio.hide_gpus_from_tensorflow()
  shard_size = source.shard_size(
    data_config, split, process_index=process_index, process_count=process_count
  )
  local_batch = per_device_batch * local_devices
  if local_batch > shard_size:
    raise ValueError(
      f'A batch of {local_batch} (= local_devices {local_devices} x per_device_batch '
      f'{per_device_batch}) does not fit the {shard_size} training examples of process '
      f'{process_index}/{process_count} in {info.name!r}; use a smaller per_device_batch.'
    )
  # Every step takes exactly local_batch examples, so the position is a function of it.
  consumed = start_step * local_batch
  start_epoch, offset = divmod(consumed, shard_size)
  ds = _raw_epochs(
    source,
    data_config,
    split,
    seed=seed,
    start_epoch=start_epoch,
    shard_size=shard_size,
    process_index=process_index,
    process_count=process_count,
    what=f'the {split!r} split of {info.name!r}',
  )
  ds = ds.skip(offset)  # Raw records: nothing is decoded for the skipped part.
  calls = _parallel_calls(data_config)
  base = _stage_seed(seed, process_index, _EXAMPLE_STAGE)
  # Without augmentation the training images are the evaluation ones at train size.
  train_view = ml_collections.ConfigDict(data_config.to_dict())
  train_view.eval_image_size = int(data_config.image_size)

  def preprocess_example(i, example):
    # Stateless per-example seeds from the example's position in the whole stream:
    # deterministic under parallel map, new every epoch, the same after a resume.
    rng = tf.random.experimental.stateless_fold_in(base, i) if data_config.augment else None
    out = source.preprocess(example, data_config if rng is not None else train_view, rng=rng)
    # uint8 from here on: a quarter of float32's memory traffic and host-to-device
    # copy (the train step normalises on the device).
    return {**out, 'images': to_uint8(out['images'])}

  ds = ds.enumerate(start=consumed).map(preprocess_example, num_parallel_calls=calls)
  ds = ds.batch(per_device_batch, drop_remainder=True)
  if data_config.augment and _batch_augmentation_on(data_config):
    batch_base = _stage_seed(seed, process_index, _BATCH_STAGE)
    ds = ds.enumerate(start=start_step * local_devices).map(
      lambda i, batch: augment_batch(
        batch,
        tf.random.experimental.stateless_fold_in(batch_base, i),
        data_config,
        num_classes=info.num_classes,
      ),
      num_parallel_calls=calls,
    )
  ds = ds.batch(local_devices, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options(data_config))
  return as_numpy(ds)


def _approx_bytes(
  source: sources.DataSource, data_config: ml_collections.ConfigDict, split: str, process_count: int
) -> int | None:
  total = source.approx_bytes(data_config, split)
  return None if total is None else int(math.ceil(total / process_count))


def eval_steps(
  data_config: ml_collections.ConfigDict,
  *,
  split: str,
  per_device_batch: int,
  local_devices: int,
  process_count: int = 1,
) -> int:
  """Number of batches ``eval_iterator`` yields; the same on every process."""
  data_config = sources.with_defaults(data_config)
  _check_int('per_device_batch', per_device_batch, 1)
  _check_int('local_devices', local_devices, 1)
  _check_int('process_count', process_count, 1)
  source, split = sources.eval_source(data_config, split)
  sources.validate_split(source, source.info(data_config), split, data_config)
  max_shard = max(
    source.shard_size(data_config, split, process_index=p, process_count=process_count)
    for p in range(process_count)
  )
  return max(1, math.ceil(max_shard / (per_device_batch * local_devices)))


def eval_iterator(
  data_config: ml_collections.ConfigDict,
  *,
  split: str,
  per_device_batch: int,
  local_devices: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """One pass, in a fixed order and without augmentation, over this process's shard of
  ``split``, at ``eval_image_size(data_config)`` with ``data_config.eval_preprocess``.
  ``split`` is an evaluation entry (``sources.eval_source``): a split of the training
  dataset, or another dataset of its classes ('imagenet_v2', 'imagenet2012_real'), read
  with the training dataset's evaluation preprocessing.

  Yields {'images', 'labels', 'mask'} with leading axes [local_devices, per_device_batch].
  Padding (zero images, label 0, mask 0) fills the last batch and, where shards differ in
  size, extends the shorter shards so that every process yields the same number of batches
  (``eval_steps``): collective eval steps then never hang. Summed over processes, the
  masked examples are exactly the split, each once.
  """
  data_config = sources.with_defaults(data_config)
  _check_common(data_config, per_device_batch, local_devices, process_index, process_count)
  entry = split
  source, split = sources.eval_source(data_config, entry)
  info = source.info(data_config)
  sources.validate_split(source, info, split, data_config)
  fileio.hide_gpus_from_tensorflow()
  ds, shard_size = source.examples(
    data_config, split, process_index=process_index, process_count=process_count
  )
  if shard_size is None:
    raise ValueError(f'Source {info.name!r} returned an eval shard of unknown size.')
  steps = eval_steps(
    data_config,
    split=entry,
    per_device_batch=per_device_batch,
    local_devices=local_devices,
    process_count=process_count,
  )
  calls = _parallel_calls(data_config)
  ds = ds.map(
    lambda ex: _normalize(source.preprocess(ex, data_config, rng=None)), num_parallel_calls=calls
  )
  ds = pad_with_mask(ds, num_real=shard_size, padded_size=steps * per_device_batch * local_devices)
  ds = batch_for_devices(
    ds, local_devices=local_devices, per_device_batch=per_device_batch, drop_remainder=True
  )
  # Evaluation order must not depend on thread timing: always deterministic.
  options = pipeline_options(data_config)
  options.deterministic = True
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(options)
  return as_numpy(ds)
