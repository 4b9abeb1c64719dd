"""MixUp / CutMix: every output is checked against the inputs pixel by pixel in NumPy.

The images are random floats, so an output pixel equal to the partner's pixel is a
pasted pixel (collisions have probability ~0); the labels are distinct classes, so each
example's own mixing weight can be read back from its label.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from nfnet_jax import fileio
from nfnet_jax.data.augment import mixing

fileio.hide_gpus_from_tensorflow()


def _batch(batch_size, height, width, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, (batch_size, height, width, channels)).astype(np.float32)
  labels = rng.permutation(batch_size + 3)[:batch_size].astype(np.int32)
  return images, labels, batch_size + 3


def _one_hot(labels, num_classes):
  return np.eye(num_classes, dtype=np.float64)[labels]


def _check_label_sums(out_labels):
  np.testing.assert_allclose(out_labels.sum(-1), 1.0, atol=1e-6)
  assert (out_labels >= -1e-7).all()


def _check_mixup(images, labels, num_classes, out_images, out_labels):
  """Example i == lam_i * x_i + (1 - lam_i) * x_{n-1-i}, with lam_i read off its label."""
  n = len(images)
  _check_label_sums(out_labels)
  eye = _one_hot(labels, num_classes)
  lams = []
  for i in range(n):
    partner = n - 1 - i
    if partner == i:  # lam * x + (1 - lam) * x: equal up to float rounding.
      np.testing.assert_allclose(out_images[i], images[i], rtol=1e-6)
      np.testing.assert_allclose(out_labels[i], eye[i], atol=1e-6)
      continue
    lam = float(out_labels[i, labels[i]])
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(out_labels[i], lam * eye[i] + (1 - lam) * eye[partner], atol=1e-6)
    np.testing.assert_allclose(
      out_images[i], lam * images[i] + (1 - lam) * images[partner], rtol=1e-5, atol=1e-3
    )
    lams.append(lam)
  return lams


def _check_cutmix(images, labels, num_classes, out_images, out_labels):
  """Each output is its own image with one axis-aligned box of the partner's pixels, and
  the partner's label weight is the pasted pixel fraction (counted here)."""
  n, height, width, _ = images.shape
  _check_label_sums(out_labels)
  eye = _one_hot(labels, num_classes)
  fractions = []
  for i in range(n):
    partner = n - 1 - i
    if partner == i:
      np.testing.assert_array_equal(out_images[i], images[i])
      np.testing.assert_allclose(out_labels[i], eye[i], atol=1e-6)
      continue
    pasted = (out_images[i] == images[partner]).all(-1)
    kept = (out_images[i] == images[i]).all(-1)
    assert not (pasted & kept).any()  # Random floats: no pixel equals its partner's.
    assert (pasted | kept).all(), 'every pixel is either kept or pasted'
    rows, cols = pasted.any(1), pasted.any(0)
    np.testing.assert_array_equal(pasted, rows[:, None] & cols[None, :])  # a rectangle
    for axis in (rows, cols):
      idx = np.flatnonzero(axis)
      if idx.size:
        assert idx[-1] - idx[0] + 1 == idx.size, 'the box is contiguous'
    fraction = pasted.sum() / (height * width)
    np.testing.assert_allclose(
      out_labels[i], (1 - fraction) * eye[i] + fraction * eye[partner], atol=1e-6
    )
    fractions.append(fraction)
  return fractions


def _seed(s):
  return tf.constant([s, 12345], tf.int64)


def test_one_hot():
  out = mixing.one_hot(tf.constant([2, 0, 1]), 4).numpy()
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, np.eye(4)[[2, 0, 1]])


@settings(max_examples=20, deadline=None)
@given(
  batch_size=st.integers(1, 9),
  height=st.integers(1, 20),
  width=st.integers(1, 20),
  seed=st.integers(0, 2**31 - 1),
)
def test_mixup_is_a_convex_combination_with_the_reversed_batch(batch_size, height, width, seed):
  images, labels, num_classes = _batch(batch_size, height, width, seed=seed % 1000)
  out_images, out_labels = mixing.mixup(images, labels, _seed(seed), 0.2, num_classes=num_classes)
  assert out_images.dtype == tf.float32 and out_images.shape == images.shape
  assert out_labels.shape == (batch_size, num_classes)
  _check_mixup(images, labels, num_classes, out_images.numpy(), out_labels.numpy())


@settings(max_examples=25, deadline=None)
@given(
  batch_size=st.integers(1, 9),
  height=st.integers(1, 24),
  width=st.integers(1, 24),
  seed=st.integers(0, 2**31 - 1),
)
def test_cutmix_pastes_one_box_and_weights_labels_by_its_area(batch_size, height, width, seed):
  images, labels, num_classes = _batch(batch_size, height, width, seed=seed % 1000)
  out_images, out_labels = mixing.cutmix(images, labels, _seed(seed), num_classes=num_classes)
  assert out_images.shape == images.shape and out_labels.shape == (batch_size, num_classes)
  _check_cutmix(images, labels, num_classes, out_images.numpy(), out_labels.numpy())


@settings(max_examples=20, deadline=None)
@given(
  batch_size=st.integers(1, 11),
  height=st.integers(2, 16),
  width=st.integers(2, 16),
  seed=st.integers(0, 2**31 - 1),
)
def test_first_half_mixup_second_half_cutmix(batch_size, height, width, seed):
  images, labels, num_classes = _batch(batch_size, height, width, seed=seed % 1000)
  out_images, out_labels = mixing.mixup_cutmix(
    images, labels, _seed(seed), alpha=0.2, num_classes=num_classes
  )
  out_images, out_labels = out_images.numpy(), out_labels.numpy()
  half = (batch_size + 1) // 2  # The extra example of an odd batch goes to MixUp.
  _check_mixup(images[:half], labels[:half], num_classes, out_images[:half], out_labels[:half])
  _check_cutmix(images[half:], labels[half:], num_classes, out_images[half:], out_labels[half:])


def test_halves_really_differ():
  # A MixUp output is (almost surely) not a pixel copy; a CutMix output is.
  images, labels, num_classes = _batch(8, 12, 12)
  out_images, _ = mixing.mixup_cutmix(images, labels, _seed(3), num_classes=num_classes)
  out_images = out_images.numpy()
  for i in range(4):
    assert not np.isin(out_images[i], images).all()
  for i in range(4, 8):
    assert np.isin(out_images[i], images).all()


def test_alpha_zero_and_cutmix_off():
  images, labels, num_classes = _batch(6, 10, 9)
  eye = _one_hot(labels, num_classes)
  # Neither: identity with one-hot labels.
  out_images, out_labels = mixing.mixup_cutmix(
    images, labels, _seed(0), alpha=0.0, cutmix=False, num_classes=num_classes
  )
  np.testing.assert_array_equal(out_images.numpy(), images)
  np.testing.assert_array_equal(out_labels.numpy(), eye)
  # Only CutMix: the whole batch.
  out_images, out_labels = mixing.mixup_cutmix(
    images, labels, _seed(0), alpha=0, num_classes=num_classes
  )
  _check_cutmix(images, labels, num_classes, out_images.numpy(), out_labels.numpy())
  # Only MixUp: the whole batch.
  out_images, out_labels = mixing.mixup_cutmix(
    images, labels, _seed(0), alpha=0.2, cutmix=False, num_classes=num_classes
  )
  _check_mixup(images, labels, num_classes, out_images.numpy(), out_labels.numpy())
  # mixup itself with alpha 0 is the identity.
  out_images, out_labels = mixing.mixup(images, labels, _seed(0), 0.0, num_classes=num_classes)
  np.testing.assert_array_equal(out_images.numpy(), images)
  np.testing.assert_array_equal(out_labels.numpy(), eye)


def test_soft_labels_are_mixed_too():
  rng = np.random.default_rng(1)
  images, _, _ = _batch(4, 6, 6)
  soft = rng.dirichlet(np.ones(5), size=4).astype(np.float32)
  out_images, out_labels = mixing.mixup(images, soft, _seed(5), 0.2)
  out_images, out_labels = out_images.numpy(), out_labels.numpy()
  _check_label_sums(out_labels)
  for i in range(4):
    # Recover lam from the pixels (least squares), then check the labels with it.
    a, b = images[i].ravel() - images[3 - i].ravel(), out_images[i].ravel() - images[3 - i].ravel()
    lam = float(a @ b / (a @ a))
    np.testing.assert_allclose(out_labels[i], lam * soft[i] + (1 - lam) * soft[3 - i], atol=1e-4)


def test_determinism_per_seed():
  images, labels, num_classes = _batch(6, 8, 8)
  run = lambda s: [
    t.numpy() for t in mixing.mixup_cutmix(images, labels, _seed(s), num_classes=num_classes)
  ]
  first, again, other = run(7), run(7), run(8)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[1], other[1])


def test_graph_mode_in_tf_data_matches_eager():
  images, labels, num_classes = _batch(10, 8, 8)
  # drop_remainder=False: the batch dimension is unknown while tracing.
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(5)
  ds = ds.enumerate().map(
    lambda i, b: mixing.mixup_cutmix(
      b[0], b[1], tf.random.experimental.stateless_fold_in(_seed(1), i), num_classes=num_classes
    )
  )
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 2
  for i, (out_images, out_labels) in enumerate(batches):
    # int64 like enumerate's counter: stateless_fold_in's result depends on the dtype.
    seed = tf.random.experimental.stateless_fold_in(_seed(1), tf.constant(i, tf.int64))
    eager = mixing.mixup_cutmix(
      images[5 * i : 5 * i + 5], labels[5 * i : 5 * i + 5], seed, num_classes=num_classes
    )
    np.testing.assert_allclose(out_images, eager[0].numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(out_labels, eager[1].numpy(), atol=1e-6)


def test_mixup_lambda_is_beta_distributed():
  # 2000 examples of 1x1 pixel: lam_i read from the labels follows Beta(0.2, 0.2)
  # (mean 1/2, variance 0.2^2 / (0.4^2 * 1.4) = 0.1786).
  n = 2000
  images, labels, num_classes = _batch(n, 1, 1)
  _, out_labels = mixing.mixup(images, labels, _seed(11), 0.2, num_classes=num_classes)
  out_labels = out_labels.numpy()
  lams = out_labels[np.arange(n), labels]
  assert scipy.stats.kstest(lams, 'beta', args=(0.2, 0.2)).pvalue > 1e-3
  assert abs(lams.var() - 0.04 / (0.16 * 1.4)) < 0.02


def test_cutmix_mean_area():
  # Box side ratio r = sqrt(u), u ~ U(0, 1), centre uniform: the clipped side has expected
  # length r - r^2 / 4 (for r <= 1), so the expected pasted area is
  # E[(r - r^2/4)^2] = E[u] - E[u^1.5] / 2 + E[u^2] / 16 = 1/2 - 1/5 + 1/48 ~ 0.321
  # (the pixel floors make it slightly smaller at 64 x 64).
  n = 2000
  images, labels, num_classes = _batch(n, 64, 64, channels=1)
  boxes = mixing.cutmix_boxes(_seed(4), n, 64, 64).numpy()
  areas = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / 64**2
  assert abs(areas.mean() - (1 / 2 - 1 / 5 + 1 / 48)) < 0.02
  assert 0 <= areas.min() and areas.max() <= 1
  del images, labels, num_classes


def test_bad_arguments():
  images, labels, _ = _batch(2, 4, 4)
  with pytest.raises(ValueError, match='num_classes'):
    mixing.mixup_cutmix(images, labels, _seed(0))
  with pytest.raises(ValueError, match='alpha'):
    mixing.mixup_cutmix(images, labels, _seed(0), alpha=-1.0, num_classes=5)
  with pytest.raises(ValueError, match='alpha'):
    mixing.mixup(images, labels, _seed(0), float('nan'), num_classes=5)


@settings(max_examples=15, deadline=None)
@given(
  batch_size=st.integers(1, 9),
  height=st.integers(2, 12),
  width=st.integers(2, 12),
  seed=st.integers(0, 2**31 - 1),
)
def test_uint8_batches_stay_uint8_and_equal_the_rounded_float_result(
  batch_size, height, width, seed
):
  # The training pipeline mixes uint8 batches: CutMix must move pixels exactly and MixUp
  # must round the float mix (per pixel, to the nearest level).
  rng = np.random.default_rng(seed % 1000)
  images = rng.integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
  labels = rng.permutation(batch_size + 3)[:batch_size].astype(np.int32)
  out8, labels8 = mixing.mixup_cutmix(
    images, labels, _seed(seed), alpha=0.2, num_classes=batch_size + 3
  )
  out32, labels32 = mixing.mixup_cutmix(
    images.astype(np.float32), labels, _seed(seed), alpha=0.2, num_classes=batch_size + 3
  )
  assert out8.dtype == tf.uint8
  np.testing.assert_array_equal(labels8.numpy(), labels32.numpy())
  expected = np.rint(out32.numpy())  # NumPy rounds half to even, like tf.round
  np.testing.assert_array_equal(out8.numpy(), expected.astype(np.uint8))
