"""Helpers shared by several data tests (one home, so no test imports another)."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
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
