"""scikit-learn's handwritten digits: the embedded default dataset (no download).

1797 real 8x8 grayscale scans, values 0..16, ten classes '0'..'9', shipped inside the
scikit-learn package (``sklearn.datasets.load_digits``).

Split (fixed, identical on every machine and library version): stratified by class,
``NUM_TEST = 360`` test examples and 1437 train. Within each class the examples are
ordered by SHA-256 of ``b'nfnet_jax/digits/v1:<index>'`` (index into load_digits'
order); class c contributes its first k_c examples to 'test', where k_c is 360 spread
over the classes in proportion to their sizes (largest remainder, ties to the lower class).
No random number generator is involved. Both splits keep load_digits' order.

Preprocessing (inside tf.data): 0..16 -> 0..255 (x 255/16) grayscale -> bilinear resize
to S x S (image_size for training, eval_image_size for evaluation) -> [train with augment:
zero-pad round(max_shift * S) px per side and random-crop back to S x S, i.e. a random
translation; no flips] -> 3 identical RGB channels. The pipeline then normalises with the
ImageNet mean/std (and would mix and RandAugment if the config asked for it).

As a command, writes the test digits as an image folder (see ``write_folder``):

    python -m nfnet_jax.data.digits --write-folder ROOT [--task parity|digits]
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from typing import Mapping, Sequence

from absl import flags
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from nfnet_jax import cli
from nfnet_jax.data import sources

NAME = 'digits'
NUM_CLASSES = 10
CLASS_NAMES = tuple(str(i) for i in range(NUM_CLASSES))
NUM_TEST = 360
NUM_EXAMPLES = {'train': 1797 - NUM_TEST, 'test': NUM_TEST}
SPLITS = tuple(NUM_EXAMPLES)
_SPLIT_SALT = b'nfnet_jax/digits/v1:'


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
  # scikit-learn takes about a second to import; only the first load needs it.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = digits.images.astype(np.uint8)  # Exact: the values are integers 0..16.
  labels = digits.target.astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 examples in load_digits' order: uint8 images [N, 8, 8] in 0..16, int32 labels."""
  return _load_raw()


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
  _, labels = _load_raw()
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  # Largest-remainder allocation of NUM_TEST over the classes.
  quotas = counts * NUM_TEST / counts.sum()
  per_class = np.floor(quotas).astype(int)
  remainder_order = sorted(range(NUM_CLASSES), key=lambda c: (-(quotas[c] - per_class[c]), c))
  for c in remainder_order[: NUM_TEST - per_class.sum()]:
    per_class[c] += 1
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    members = sorted(members, key=lambda i: hashlib.sha256(_SPLIT_SALT + b'%d' % i).digest())
    test.extend(members[: per_class[c]])
  is_test = np.zeros(len(labels), bool)
  is_test[test] = True
  out = {'train': np.flatnonzero(~is_test), 'test': np.flatnonzero(is_test)}
  for v in out.values():
    v.flags.writeable = False
  return out


def split_indices(split: str) -> np.ndarray:
  """Indices (into ``load_raw()``) of the examples of ``split``, ascending."""
  if split not in SPLITS:
    raise ValueError(
      f'Unknown split {split!r} for dataset {NAME!r}; valid splits: {", ".join(SPLITS)}.'
    )
  return _split_indices()[split]


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [n, 8, 8] in 0..16, int32 labels [n]) of ``split``."""
  idx = split_indices(split)
  images, labels = _load_raw()
  return images[idx], labels[idx]


class DigitsSource(sources.DataSource):
  """The ``sources.DataSource`` for digits."""

  name = NAME
  train_split = 'train'

  def info(self, data_config: ml_collections.ConfigDict) -> sources.DatasetInfo:
    del data_config  # The same whatever the preprocessing.
    return sources.DatasetInfo(
      name=NAME, num_classes=NUM_CLASSES, num_examples=dict(NUM_EXAMPLES), class_names=CLASS_NAMES
    )

  def examples(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
    shuffle_seed: int | tf.Tensor | None = None,
  ) -> tuple[tf.data.Dataset, int]:
    del data_config, shuffle_seed  # In memory: the pipeline's shuffle is enough.
    images, labels = load_split(split)
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    ds, _ = sources.shard_for_process(ds, process_index, process_count)
    # From the arrays: inside a tf.data function the dataset's cardinality is symbolic.
    return ds, len(range(process_index, len(labels), process_count))

  def shard_size(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
  ) -> int:
    del data_config
    return len(range(process_index, len(split_indices(split)), process_count))

  def preprocess(
    self,
    example: Mapping[str, tf.Tensor],
    data_config: ml_collections.ConfigDict,
    *,
    rng: tf.Tensor | None,
  ) -> dict[str, tf.Tensor]:
    size = int(data_config.image_size if rng is not None else sources.eval_image_size(data_config))
    image = tf.cast(example['image'], tf.float32) * (255.0 / 16.0)  # 0..16 -> 0..255.
    image = tf.image.resize(image[:, :, None], (size, size), method='bilinear', antialias=False)
    if rng is not None:
      pad = int(round(float(data_config.max_shift) * size))
      if pad < 0:
        raise ValueError(f'data_config.max_shift must be >= 0, got {data_config.max_shift}.')
      if pad > 0:  # Background is 0: zero padding extends it.
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, (size, size, 1), seed=rng)
    return {'images': tf.tile(image, [1, 1, 3]), 'labels': tf.cast(example['label'], tf.int32)}


SOURCE = DigitsSource()


# ---------------------------------------------------------------------------------------
# The digits as an image folder: a local dataset for trying the folder source and
# fine-tuning (experiments/finetune.py:digits) without a download.
# ---------------------------------------------------------------------------------------

FOLDER_TASKS = {
  'digits': lambda y: str(y),
  'parity': lambda y: ('even', 'odd')[y % 2],
}


def write_folder(root: str, task: str = 'parity') -> dict[str, int]:
  """Writes the 360 *test* digits (never seen by the quickstart's training) as 8x8 PNGs:
  root/train/<class>/ gets the even positions of the test split, root/val/<class>/ the odd
  ones. Classes are the digits ('digits') or 'even'/'odd' ('parity'). Returns counts."""
  if task not in FOLDER_TASKS:
    raise ValueError(f'Unknown task {task!r}; valid: {", ".join(FOLDER_TASKS)}.')
  images, labels = load_split('test')
  counts = {'train': 0, 'val': 0}
  for i, (image, label) in enumerate(zip(images, labels, strict=True)):
    split = 'train' if i % 2 == 0 else 'val'
    directory = os.path.join(root, split, FOLDER_TASKS[task](int(label)))
    os.makedirs(directory, exist_ok=True)
    pixels = np.rint(image.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    Image.fromarray(pixels, mode='L').save(os.path.join(directory, f'{i:03d}.png'))
    counts[split] += 1
  return counts


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'write_folder',
    None,
    'Root directory: the images go to ROOT/train/<class>/ and ROOT/val/<class>/.',
    required=True,
    flag_values=values,
  )
  flags.DEFINE_enum(
    'task',
    'parity',
    sorted(FOLDER_TASKS),
    "Classes: 'parity' (even/odd) or 'digits' (0..9).",
    flag_values=values,
  )


def _write_folder_cli(args: flags.FlagValues, positional: list[str]) -> None:
  del positional  # cli.run refuses positional arguments
  counts = write_folder(args.write_folder, args.task)
  print(
    f'wrote {counts["train"]} train and {counts["val"]} val images ({args.task}) '
    f'to {args.write_folder}'
  )


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m nfnet_jax.data.digits --write-folder ROOT [--task parity|digits]``."""
  return cli.run(_write_folder_cli, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
