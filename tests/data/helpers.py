"""Helpers shared by several data tests (one home, so no test imports another)."""

import os

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
from PIL import Image
from sklearn import datasets as sk_datasets

from nfnet_jax import data
from nfnet_jax.data import digits

# The ImageNet statistics, written out independently of the package.
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def data_config(**overrides):
  cfg = data.default_data_config()
  cfg.update(overrides)
  return cfg


def denorm(images):
  return images * STD + MEAN


# ---------------------------------------------------------------------------------------
# Training streams.
# ---------------------------------------------------------------------------------------

# Every batch-level augmentation at once: MixUp, CutMix, then RandAugment.
MIX_AND_RANDAUGMENT = dict(mixup_alpha=0.2, cutmix=True, randaug_layers=2, randaug_magnitude=10.0)


def train_batches(cfg, n, **kwargs):
  """The first n batches of ``data.train_iterator(cfg, **kwargs)``."""
  it = data.train_iterator(cfg, **kwargs)
  return [next(it) for _ in range(n)]


def assert_resumes_exactly(cfg, start_steps, *, num_batches=2, **kwargs):
  """train_iterator(start_step=k) yields batches k+1..k+num_batches of start_step=0,
  bit for bit, for every k in start_steps."""
  reference = train_batches(cfg, max(start_steps) + num_batches, start_step=0, **kwargs)
  for k in start_steps:
    resumed = train_batches(cfg, num_batches, start_step=k, **kwargs)
    for j, batch in enumerate(resumed):
      expected = reference[k + j]
      assert set(batch) == set(expected)
      for key in batch:
        assert batch[key].dtype == expected[key].dtype, (k, j, key)
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=f'{k=} {j=} {key=}')


def resume_point(shard_size, local_batch):
  """A step to resume from that exercises every part of resuming: it lies inside epoch 1
  (epoch 0 skipped whole, then some raw records of epoch 1), and the first batch it
  yields spans the boundary between epochs 1 and 2."""
  step = 2 * shard_size // local_batch
  assert shard_size < step * local_batch < 2 * shard_size < (step + 1) * local_batch
  return step


def write_image_folder(root, per_class=(5, 4, 6), size=(12, 10)):
  """root/<class>/<i>.png: random-noise RGB images (so that crops, flips and RandAugment
  all change them), classes 'c0', 'c1', ...; returns the number of images."""
  i = 0
  for c, n in enumerate(per_class):
    os.makedirs(os.path.join(root, f'c{c}'), exist_ok=True)
    for _ in range(n):
      image = random_image(size[1], size[0], seed=i)
      Image.fromarray(image).save(os.path.join(root, f'c{c}', f'{i:03d}.png'))
      i += 1
  return i


# ---------------------------------------------------------------------------------------
# Digits.
# ---------------------------------------------------------------------------------------


def raw_split(split):
  """Independent of the module: straight from sklearn, by the module's indices."""
  raw = sk_datasets.load_digits()
  idx = digits.split_indices(split)
  return raw.images[idx], raw.target[idx]


def fingerprints(images8, labels):
  """0..255 images at 8x8 -> hashable (raw 0..16 bytes, label) per example."""
  raw = np.rint(images8[..., 0] * 16 / 255).astype(np.uint8)
  return [(r.tobytes(), int(label)) for r, label in zip(raw, labels, strict=True)]


# ---------------------------------------------------------------------------------------
# RandAugment ops.
# ---------------------------------------------------------------------------------------

HYPOTHESIS_SETTINGS = hypothesis.settings(max_examples=25, deadline=None)
SMALL_IMAGES = hnp.arrays(np.uint8, st.tuples(st.integers(1, 10), st.integers(1, 10), st.just(3)))


def random_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def numpy_cutout(x, pad, cy, cx):
  out = x.copy()
  out[max(cy - pad, 0) : max(cy + pad, 0), max(cx - pad, 0) : max(cx + pad, 0)] = 128
  return out


def cutout_centres(got, x, pad):
  """All centres (cy, cx) for which the NumPy cutout equals ``got``."""
  h, w = x.shape[:2]
  return [
    (cy, cx)
    for cy in range(h)
    for cx in range(w)
    if np.array_equal(got, numpy_cutout(x, pad, cy, cx))
  ]
