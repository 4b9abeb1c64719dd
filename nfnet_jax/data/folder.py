"""Your own images: an image-folder source (``data.name = 'folder'``).

Two layouts under ``data.folder`` (local or gs://):

    root/<class>/<image>                      one split, 'train' (plus 'holdout' when
                                              data.holdout_fraction > 0)
    root/<split>/<class>/<image>              splits named by the directories among
                                              train/, val/, validation/, test/

Class index: the sorted class-directory names of the train split, label 0, 1, ...; other
splits may lack classes but may not add any. ``train.py`` writes the index next to the
checkpoints (``class_index.json``) and refuses to resume when the classes changed.

Images: .jpg .jpeg .png .gif .bmp (any case), including grayscale, CMYK and RGBA files
(decoded to RGB). Other files are ignored (counted in the log). Every image is decoded
once when a split is first opened (in parallel, with TensorFlow's decoders, the same
ones training uses): a corrupt or truncated file is then skipped with a warning that
counts and names the bad files (``data.skip_corrupt=False`` stops instead, with the
list), so an epoch never crashes on one and no example is silently wrong. The check
runs once per split and process; for millions of images, build a TFDS dataset instead.

Holdout: with the one-directory layout, ``holdout_fraction`` of the images (chosen by a
SHA-256 of their path relative to root, so stable across machines, runs and added files)
form the 'holdout' split and are removed from 'train'.

Sharding: process p of n reads the p-th contiguous, near-equal range of the sorted,
checked file list; training shuffles the paths (cheap, a new order each epoch) before
reading the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Mapping

import ml_collections
import numpy as np
import tensorflow as tf

from nfnet_jax import fileio
from nfnet_jax.data import preprocess, sources

NAME = 'folder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
SPLIT_DIRS = ('train', 'val', 'validation', 'test')
HOLDOUT_SPLIT = 'holdout'
_HOLDOUT_SALT = b'nfnet_jax/folder/holdout/v1:'


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The checked contents of an image folder."""

  root: str
  class_names: tuple[str, ...]
  files: dict[str, tuple[str, ...]]  # split -> sorted paths (decodable only)
  labels: dict[str, np.ndarray]  # split -> int32 labels
  corrupt: dict[str, tuple[str, ...]]  # split -> undecodable paths
  num_bytes: dict[str, int]


def _subdirs(path: str) -> list[str]:
  return sorted(
    d.rstrip('/')
    for d in tf.io.gfile.listdir(path)
    if not d.startswith('.') and tf.io.gfile.isdir(os.path.join(path, d))
  )


def _images_of(class_dir: str) -> tuple[list[str], int]:
  """Image paths under class_dir (recursively), sorted; and how many other files."""
  found, ignored = [], 0
  for dirpath, _, filenames in tf.io.gfile.walk(class_dir):
    for f in filenames:
      if f.startswith('.'):
        continue
      if f.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.join(dirpath, f))
      else:
        ignored += 1
  return sorted(found), ignored


def _decodable(paths: list[str]) -> np.ndarray:
  """Which files TensorFlow's decoders (the ones training uses) accept, in parallel."""
  ok = np.zeros(len(paths), bool)
  if not paths:
    return ok
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), list(paths)))

  def check(i, path):
    image = preprocess.decode_rgb(tf.io.read_file(path))
    return i, tf.shape(image)[0]

  # ignore_errors drops exactly the elements whose decode raised: the corrupt files.
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  for i, _ in ds.as_numpy_iterator():
    ok[i] = True
  return ok


def _holdout_mask(root: str, paths: list[str], fraction: float) -> np.ndarray:
  def u(p):
    rel = os.path.relpath(p, root).replace(os.sep, '/').encode()
    return int.from_bytes(hashlib.sha256(_HOLDOUT_SALT + rel).digest()[:8], 'big') / 2**64

  return np.array([u(p) < fraction for p in paths], bool)


_INDEX_CACHE: dict[tuple, FolderIndex] = {}


def load_index(
  root: str, holdout_fraction: float = 0.0, *, skip_corrupt: bool = True
) -> FolderIndex:
  """Scans, checks and indexes ``root`` (cached per process)."""
  if not root:
    raise ValueError(
      "data.name='folder' needs data.folder: the root directory of your "
      'images (root/<class>/<image> or root/<split>/<class>/<image>).'
    )
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f'data.folder={root!r} is not a directory.')
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(f'data.holdout_fraction must be in [0, 1), got {holdout_fraction}.')
  key = (
    root if fileio.is_remote(root) else os.path.abspath(root),
    float(holdout_fraction),
    bool(skip_corrupt),
  )
  if key in _INDEX_CACHE:
    return _INDEX_CACHE[key]

  top = _subdirs(root)
  split_dirs = [d for d in top if d in SPLIT_DIRS]
  if split_dirs:
    if 'train' not in split_dirs and len(split_dirs) != len(top):
      raise ValueError(
        f'{root} mixes split directories {split_dirs} with other '
        'directories; use root/<class>/... or root/<split>/<class>/....'
      )
    layout = {s: os.path.join(root, s) for s in split_dirs}
    if holdout_fraction:
      raise ValueError(
        f'{root} already has split directories {split_dirs}: leave data.holdout_fraction at 0.'
      )
  else:
    layout = {'train': root}
  class_split = 'train' if 'train' in layout else sorted(layout)[0]
  class_names = tuple(_subdirs(layout[class_split]))
  if not class_names:
    raise ValueError(
      f'{layout[class_split]} has no class directories: expected <class>/<image> files below it.'
    )
  label_of = {c: i for i, c in enumerate(class_names)}

  files, labels, corrupt, num_bytes = {}, {}, {}, {}
  ignored = 0
  for split, split_root in layout.items():
    classes = _subdirs(split_root)
    unknown = sorted(set(classes) - set(label_of))
    if unknown:
      raise ValueError(
        f'Split {split!r} of {root} has classes that {class_split!r} lacks: '
        f'{unknown[:10]}. Every class must appear in {class_split}/.'
      )
    paths, ys = [], []
    for c in classes:
      found, n_other = _images_of(os.path.join(split_root, c))
      ignored += n_other
      paths += found
      ys += [label_of[c]] * len(found)
    ok = _decodable(paths)
    bad = tuple(p for p, good in zip(paths, ok, strict=True) if not good)
    if bad:
      listing = ', '.join(bad[:10]) + (f' and {len(bad) - 10} more' if len(bad) > 10 else '')
      if not skip_corrupt:
        raise ValueError(
          f'{len(bad)} of {len(paths)} images in split {split!r} of {root} do '
          f'not decode (corrupt, truncated or not an image): {listing}. Fix '
          'or remove them, or set --config.data.skip_corrupt=True to skip them.'
        )
      logging.warning(
        'Skipping %d of %d images in split %r of %s that do not decode '
        '(corrupt, truncated or not an image): %s',
        len(bad),
        len(paths),
        split,
        root,
        listing,
      )
    keep = [p for p, good in zip(paths, ok, strict=True) if good]
    ys = np.asarray([y for y, good in zip(ys, ok, strict=True) if good], np.int32)
    if split == class_split:
      # A class without a single training image would be a label the model can never
      # learn, yet still count in the classifier and the metrics.
      counts = np.bincount(ys, minlength=len(class_names))
      empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
      if empty:
        raise ValueError(
          f'{len(empty)} class folder(s) of {split_root} have no decodable image: '
          f'{empty[:10]}. Add images to them, or remove the folders.'
        )
    if split == 'train' and holdout_fraction:
      held = _holdout_mask(root, keep, holdout_fraction)
      files[HOLDOUT_SPLIT] = tuple(p for p, h in zip(keep, held, strict=True) if h)
      labels[HOLDOUT_SPLIT] = ys[held]
      keep = [p for p, h in zip(keep, held, strict=True) if not h]
      ys = ys[~held]
    files[split], labels[split], corrupt[split] = tuple(keep), ys, bad
  for split, paths in files.items():
    if not paths:
      raise ValueError(
        f'Split {split!r} of {root} has no decodable images ({", ".join(IMAGE_EXTENSIONS)}).'
      )
    num_bytes[split] = sum(tf.io.gfile.stat(p).length for p in paths)
  if ignored:
    logging.info(
      'Ignored %d files under %s that are not %s images.',
      ignored,
      root,
      '/'.join(e[1:] for e in IMAGE_EXTENSIONS),
    )
  index = FolderIndex(
    root=root,
    class_names=class_names,
    files=files,
    labels=labels,
    corrupt=corrupt,
    num_bytes=num_bytes,
  )
  _INDEX_CACHE[key] = index
  return index


class FolderSource(sources.DataSource):
  """The ``sources.DataSource`` for image folders."""

  name = NAME
  train_split = 'train'

  def _index(self, data_config) -> FolderIndex:
    return load_index(
      data_config.folder,
      float(data_config.holdout_fraction),
      skip_corrupt=bool(data_config.skip_corrupt),
    )

  def info(self, data_config: ml_collections.ConfigDict) -> sources.DatasetInfo:
    index = self._index(data_config)
    return sources.DatasetInfo(
      name=NAME,
      num_classes=len(index.class_names),
      num_examples={s: len(f) for s, f in index.files.items()},
      class_names=index.class_names,
    )

  def _bounds(self, data_config, split, process_index, process_count):
    index = self._index(data_config)
    start, end = sources.even_shard_bounds(len(index.files[split]), process_index, process_count)
    return index, start, end

  def examples(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
    shuffle_seed: int | tf.Tensor | None = None,
  ) -> tuple[tf.data.Dataset, int]:
    index, start, end = self._bounds(data_config, split, process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices(
      {'path': list(index.files[split][start:end]), 'label': index.labels[split][start:end]}
    )
    if shuffle_seed is not None:
      # Shuffling paths is free; shuffling decoded-size bytes in a buffer is not. A full
      # permutation, the same for the same seed (train_iterator seeds each epoch).
      ds = ds.shuffle(end - start, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.map(
      lambda ex: {'image': tf.io.read_file(ex['path']), 'label': ex['label']},
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds, end - start

  def shard_size(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
  ) -> int:
    _, start, end = self._bounds(data_config, split, process_index, process_count)
    return end - start

  def approx_bytes(self, data_config: ml_collections.ConfigDict, split: str) -> int:
    return self._index(data_config).num_bytes[split]

  def preprocess(
    self,
    example: Mapping[str, tf.Tensor],
    data_config: ml_collections.ConfigDict,
    *,
    rng: tf.Tensor | None,
  ) -> dict[str, tf.Tensor]:
    return preprocess.decoded_image_preprocess(example, data_config, rng=rng)


SOURCE = FolderSource()
