"""The batched RandAugment ops (nfnet_jax.data.augment.ops), each checked against Pillow
and/or NumPy on single images (through the per-image reference, which runs each op on a
batch of one).

The references here are written independently of the implementation: Pillow's own
ImageOps / ImageEnhance / Image.transform where Pillow has the op, plain NumPy where it
does not (SolarizeAdd, Cutout, 0-bit Posterize).
"""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
import pytest
import tensorflow as tf

from nfnet_jax.data.augment import randaugment as ra
from tests.data import randaugment_reference as ref
from tests.data.helpers import HYPOTHESIS_SETTINGS, SMALL_IMAGES, cutout_centres, random_image

GREY = (128, 128, 128)
SIZES = [(17, 23), (32, 32)]  # Odd and even, non-square and square.


def _pil(x):
  return Image.fromarray(x)


def _np(x):
  return np.asarray(x)


def _check_enhanced(got, want):
  """Enhance ops: at most 1 level off, and almost always exact.

  Pillow blends in C float32 as ``in1 + alpha * (in2 - in1)`` and truncates; the
  implementation performs the same float32 operations, which is bit-identical on the
  machines we measured (0 differing values). One level is allowed because a build that
  contracts the multiply-add into an FMA rounds once instead of twice, which can move a
  value across an integer; a systematic error (rounding instead of truncating, a wrong
  grey level) would change far more than 1% of the values.
  """
  got, want = np.asarray(got).astype(int), np.asarray(want).astype(int)
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= 1
  assert (got == want).mean() >= 0.99


def _check_geometric(got, want, matrix):
  """Geometric ops: identical to Pillow except on sampling ties.

  Pillow takes the input pixel containing the point (a x + b y + c, d x + e y + f) at
  output pixel centre (x + 0.5, y + 0.5), in 16.16 fixed point (or double), flooring;
  ImageProjectiveTransform computes the same point in float32 and rounds half away from
  zero. When the point lies (within rounding) on a pixel boundary the two may pick
  neighbouring pixels, or one of them may fall just outside the image and give 128.
  So: at least 98.5% of pixels identical (measured worst case 99.2%: Rotate 45 degrees
  on 32x32, where the 45-degree grid hits many exact boundaries), and every differing
  pixel must be such a tie, checked here in float64.
  """
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == np.uint8
  differ = (got != want).any(axis=-1)
  assert 1 - differ.mean() >= 0.985, f'only {1 - differ.mean():.4f} identical'
  a, b, c, d, e, f = matrix
  ys, xs = np.nonzero(differ)
  u = a * (xs + 0.5) + b * (ys + 0.5) + c
  v = d * (xs + 0.5) + e * (ys + 0.5) + f
  near_boundary = np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v))) < 1e-3
  assert near_boundary.all(), list(zip(ys[~near_boundary], xs[~near_boundary], strict=True))


def _pil_rotate_matrix(degrees, width, height):
  """Pillow's matrix for Image.rotate about (w/2, h/2), written out from its definition."""
  t = np.deg2rad(degrees)
  cx, cy = width / 2, height / 2
  # Image.rotate builds its inverse map from -angle: output p samples R(t)(p - c) + c.
  return (
    np.cos(t),
    -np.sin(t),
    cx - np.cos(t) * cx + np.sin(t) * cy,
    np.sin(t),
    np.cos(t),
    cy - np.sin(t) * cx - np.cos(t) * cy,
  )


def _factor(m):
  return m / 10 * 1.8 + 0.1


# ---------------------------------------------------------------- pixel ops


@pytest.mark.parametrize('size', SIZES)
def test_invert(size):
  x = random_image(*size)
  got = ref.invert(x).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.invert(_pil(x))))
  np.testing.assert_array_equal(got, 255 - x)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [5, 10, 15])
def test_posterize(size, m):
  x = random_image(*size)
  bits = int(m / 10 * 4)
  got = ref.posterize(x, bits).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.posterize(_pil(x), bits)))


def test_posterize_all_bits():
  x = random_image(9, 11)
  for bits in range(0, 9):
    np.testing.assert_array_equal(
      ref.posterize(x, bits).numpy(), x & np.uint8((0xFF << (8 - bits)) & 0xFF)
    )
  # Pillow rejects 0 bits; the mapping yields it for m < 2.5 and it means black.
  np.testing.assert_array_equal(ref.posterize(x, 0).numpy(), np.zeros_like(x))
  np.testing.assert_array_equal(ref.posterize(x, 12).numpy(), x)
  np.testing.assert_array_equal(ref.posterize(x, -3).numpy(), np.zeros_like(x))


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [3, 5, 10, 15])
def test_solarize(size, m):
  x = random_image(*size)
  threshold = int(m / 10 * 256)
  got = ref.solarize(x, threshold).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.solarize(_pil(x), threshold)))
  np.testing.assert_array_equal(got, np.where(x >= threshold, 255 - x, x))


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [3, 10, 15])
def test_solarize_add(size, m):
  x = random_image(*size)
  addition = int(m / 10 * 110)
  want = np.where(x < 128, np.minimum(x.astype(int) + addition, 255), x)
  np.testing.assert_array_equal(ref.solarize_add(x, addition).numpy(), want)
  want = np.where(x < 200, np.minimum(x.astype(int) + 7, 255), x)
  np.testing.assert_array_equal(ref.solarize_add(x, 7, threshold=200).numpy(), want)


def _test_images():
  """Random images plus ones that exercise the special cases of the histogram ops."""
  rng = np.random.default_rng(1)
  images = [random_image(*size) for size in SIZES]
  # Few distinct levels: small equalize steps (lut values that need clipping).
  images.append(rng.choice(np.array([3, 40, 41, 200], np.uint8), (17, 23, 3)))
  # A constant channel (autocontrast/equalize leave it alone) next to varied ones.
  x = random_image(16, 16, seed=2)
  x[..., 1] = 77
  images.append(x)
  # A narrow range, [0, 25], where Pillow's double-precision lut maps 25 -> 254.
  images.append(rng.integers(0, 26, (13, 9, 3), dtype=np.uint8))
  # Two levels, one pixel of the brighter one.
  x = np.full((10, 10, 3), 9, np.uint8)
  x[3, 4] = 250
  images.append(x)
  return images


@pytest.mark.parametrize('index', range(len(_test_images())))
def test_auto_contrast(index):
  x = _test_images()[index]
  got = ref.auto_contrast(x).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.autocontrast(_pil(x))))
  # Independently of Pillow: each non-constant channel spans [0, 254 or 255] and is
  # within one level of the exact linear stretch; constant channels are untouched.
  for c in range(3):
    lo, hi = int(x[..., c].min()), int(x[..., c].max())
    if lo == hi:
      np.testing.assert_array_equal(got[..., c], x[..., c])
    else:
      exact = (x[..., c].astype(int) - lo) * 255 // (hi - lo)
      assert np.abs(got[..., c].astype(int) - exact).max() <= 1
      assert got[..., c].min() == 0 and got[..., c].max() >= 254


def test_auto_contrast_keeps_pillow_rounding():
  x = np.zeros((2, 2, 3), np.uint8)
  x[0, 0] = 25
  # 25 * (255.0 / 25) rounds to just below 255 in double precision; Pillow gives 254.
  assert ref.auto_contrast(x).numpy()[0, 0, 0] == _np(ImageOps.autocontrast(_pil(x)))[0, 0, 0]


def _numpy_equalize(x):
  """PIL.ImageOps.equalize's documented algorithm, per channel, in NumPy."""
  out = np.empty_like(x)
  for c in range(3):
    h = np.bincount(x[..., c].ravel(), minlength=256)
    nonzero = h[h > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      out[..., c] = x[..., c]
      continue
    lut = (step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step
    out[..., c] = np.minimum(lut, 255)[x[..., c]]
  return out


@pytest.mark.parametrize('index', range(len(_test_images())))
def test_equalize(index):
  x = _test_images()[index]
  got = ref.equalize(x).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.equalize(_pil(x))))
  np.testing.assert_array_equal(got, _numpy_equalize(x))


@HYPOTHESIS_SETTINGS
@hypothesis.given(
  hnp.arrays(
    np.uint8,
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(3)),
    elements=st.sampled_from([0, 1, 2, 60, 128, 254, 255]) | st.integers(0, 255),
  )
)
def test_histogram_ops_match_pillow_property(x):
  np.testing.assert_array_equal(ref.equalize(x).numpy(), _np(ImageOps.equalize(_pil(x))))
  np.testing.assert_array_equal(ref.auto_contrast(x).numpy(), _np(ImageOps.autocontrast(_pil(x))))


# ---------------------------------------------------------------- enhance ops

_ENHANCERS = {
  'color': (ref.color, ImageEnhance.Color),
  'contrast': (ref.contrast, ImageEnhance.Contrast),
  'brightness': (ref.brightness, ImageEnhance.Brightness),
  'sharpness': (ref.sharpness, ImageEnhance.Sharpness),
}


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('name', sorted(_ENHANCERS))
@pytest.mark.parametrize('factor', [_factor(10), _factor(15), _factor(3), 0.37, 0.0])
def test_enhance_ops(size, name, factor):
  ours, pillows = _ENHANCERS[name]
  x = random_image(*size)
  _check_enhanced(ours(x, factor), pillows(_pil(x)).enhance(factor))


@pytest.mark.parametrize('size', SIZES)
def test_enhance_degenerate_images(size):
  """At factor 0 the blend returns the degenerate image, which is pure integer math."""
  x = random_image(*size)
  grey = (
    x[..., 0].astype(np.int64) * 299
    + x[..., 1].astype(np.int64) * 587
    + x[..., 2].astype(np.int64) * 114
  )
  # ITU-R 601-2 luma, as Pillow documents for convert('L') (to within its rounding).
  assert np.abs(ref.color(x, 0.0).numpy()[..., 0] - grey / 1000).max() <= 1
  np.testing.assert_array_equal(ref.color(x, 0.0).numpy(), _np(_pil(x).convert('L').convert('RGB')))
  np.testing.assert_array_equal(ref.brightness(x, 0.0).numpy(), np.zeros_like(x))
  mean = _np(_pil(x).convert('L')).mean()
  np.testing.assert_array_equal(ref.contrast(x, 0.0).numpy(), np.full_like(x, int(mean + 0.5)))
  smooth = _np(_pil(x).filter(ImageFilter.SMOOTH))
  np.testing.assert_array_equal(ref.sharpness(x, 0.0).numpy(), smooth)
  # And independently of Pillow: rounded 3x3 smoothing inside, border kept.
  xi = x.astype(np.int64)
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
  acc = sum(
    kernel[i, j] * xi[i : i + size[0] - 2, j : j + size[1] - 2] for i in range(3) for j in range(3)
  )
  want = x.copy()
  want[1:-1, 1:-1] = np.floor(acc / 13 + 0.5)
  np.testing.assert_array_equal(ref.sharpness(x, 0.0).numpy(), want)


@pytest.mark.parametrize('size', [(1, 1), (2, 5), (1, 7), (5, 2), (3, 3), (3, 8), (6, 3)])
def test_sharpness_small_images(size):
  x = random_image(*size)
  got = ref.sharpness(x, 2.8).numpy()
  _check_enhanced(got, ImageEnhance.Sharpness(_pil(x)).enhance(2.8))
  # The one-pixel border is copied by SMOOTH, so it survives any factor.
  border = np.ones(size, bool)
  border[1:-1, 1:-1] = False
  np.testing.assert_array_equal(got[border], x[border])
  if min(size) < 3:
    np.testing.assert_array_equal(got, x)


# ---------------------------------------------------------------- geometric ops


@pytest.mark.parametrize('size', SIZES + [(48, 64)])
@pytest.mark.parametrize('degrees', [30, -30, 45, -45, 17.3])
def test_rotate(size, degrees):
  x = random_image(*size)
  got = ref.rotate(x, degrees).numpy()
  want = _pil(x).rotate(degrees, resample=Image.NEAREST, fillcolor=GREY)
  _check_geometric(got, want, _pil_rotate_matrix(degrees, size[1], size[0]))
  # Direction: the opposite Pillow rotation agrees only where both are fill or by chance.
  opposite = _np(_pil(x).rotate(-degrees, resample=Image.NEAREST, fillcolor=GREY))
  assert (got == opposite).all(axis=-1).mean() < 0.5


def test_rotate_quarter_turn_is_counter_clockwise():
  x = random_image(16, 16)
  # np.rot90 turns the displayed image counter-clockwise, as Pillow's positive angles.
  np.testing.assert_array_equal(ref.rotate(x, 90.0).numpy(), np.rot90(x, 1))
  np.testing.assert_array_equal(ref.rotate(x, -90.0).numpy(), np.rot90(x, -1))
  np.testing.assert_array_equal(ref.rotate(x, 180.0).numpy(), np.rot90(x, 2))


@pytest.mark.parametrize('size', SIZES + [(48, 64)])
@pytest.mark.parametrize('m', [10, 15, 3])
@pytest.mark.parametrize('sign', [1, -1])
@pytest.mark.parametrize('axis', ['x', 'y'])
def test_shear(size, m, sign, axis):
  x = random_image(*size)
  level = sign * m / 10 * 0.3
  op, matrix = (
    (ref.shear_x, (1, level, 0, 0, 1, 0)) if axis == 'x' else (ref.shear_y, (1, 0, 0, level, 1, 0))
  )
  want = _pil(x).transform(
    (size[1], size[0]), Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=GREY
  )
  _check_geometric(op(x, level), want, matrix)


@pytest.mark.parametrize('size', SIZES + [(160, 200)])
@pytest.mark.parametrize('m', [10, 15, 0.3, 0.77])
@pytest.mark.parametrize('sign', [1, -1])
@pytest.mark.parametrize('axis', ['x', 'y'])
def test_translate(size, m, sign, axis):
  x = random_image(*size)
  pixels = sign * m / 10 * 100
  op, matrix = (
    (ref.translate_x, (1, 0, pixels, 0, 1, 0))
    if axis == 'x'
    else (ref.translate_y, (1, 0, 0, 0, 1, pixels))
  )
  got = op(x, pixels).numpy()
  want = _pil(x).transform(
    (size[1], size[0]), Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=GREY
  )
  _check_geometric(got, want, matrix)
  if float(pixels).is_integer():
    # Whole-pixel shifts involve no ties: exact, and equal to a NumPy shift.
    np.testing.assert_array_equal(got, _np(want))
    p = int(pixels)
    shifted = np.full_like(x, 128)
    if axis == 'x':
      src = np.arange(size[1]) + p
      ok = (src >= 0) & (src < size[1])
      shifted[:, ok] = x[:, src[ok]]
    else:
      src = np.arange(size[0]) + p
      ok = (src >= 0) & (src < size[0])
      shifted[ok] = x[src[ok]]
    np.testing.assert_array_equal(got, shifted)


# ---------------------------------------------------------------- cutout


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [1, 2])
def test_cutout(size, m):
  # Small m: the recipe's pads (40+) would grey out these small test images entirely.
  x = random_image(*size)
  pad = int(m / 10 * 40)
  centres = set()
  for i in range(40):
    got = ref.cutout(x, pad, tf.constant([i, 7], tf.int32)).numpy()
    matches = cutout_centres(got, x, pad)
    assert matches, f'seed {i}: not a {2 * pad}-pixel cutout of the image'
    centres.add(matches[0])
  # Centres spread over the image (40 draws from 391 or 1024 positions).
  assert len(centres) >= 30
  rows = [cy for cy, _ in centres]
  cols = [cx for _, cx in centres]
  assert min(rows) < size[0] / 3 and max(rows) > 2 * size[0] / 3
  assert min(cols) < size[1] / 3 and max(cols) > 2 * size[1] / 3


def test_cutout_clips_at_corners_and_is_deterministic():
  x = random_image(12, 12)
  seed = tf.constant([3, 4], tf.int64)
  a, b = ref.cutout(x, 5, seed).numpy(), ref.cutout(x, 5, seed).numpy()
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ref.cutout(x, 0, seed).numpy(), x)
  np.testing.assert_array_equal(ref.cutout(x, 40, seed).numpy(), np.full_like(x, 128))
  # Seen over many seeds, some boxes are clipped by an edge and some lie inside.
  sizes = {
    int((ref.cutout(x, 3, tf.constant([i, 0])).numpy() != x).any(-1).sum()) for i in range(60)
  }
  assert 36 in sizes and min(sizes) < 30


# ---------------------------------------------------------------- properties


@HYPOTHESIS_SETTINGS
@hypothesis.given(SMALL_IMAGES, st.floats(0, 3), st.floats(-60, 60), st.integers(-20, 20))
def test_ops_preserve_dtype_shape_and_range(x, factor, value, int_value):
  outputs = [
    ref.auto_contrast(x),
    ref.equalize(x),
    ref.invert(x),
    ref.rotate(x, value),
    ref.posterize(x, int_value),
    ref.solarize(x, int_value * 15),
    ref.color(x, factor),
    ref.contrast(x, factor),
    ref.brightness(x, factor),
    ref.sharpness(x, factor),
    ref.shear_x(x, value / 60),
    ref.shear_y(x, value / 60),
    ref.translate_x(x, value),
    ref.translate_y(x, value),
    ref.cutout(x, abs(int_value), tf.constant([int_value, 1])),
    ref.solarize_add(x, int_value * 15),
  ]
  assert len(outputs) == ra.NUM_OPS
  for out in outputs:
    assert out.dtype == tf.uint8 and out.shape == x.shape


@HYPOTHESIS_SETTINGS
@hypothesis.given(SMALL_IMAGES)
def test_identities(x):
  np.testing.assert_array_equal(ref.invert(ref.invert(x)).numpy(), x)
  np.testing.assert_array_equal(ref.posterize(x, 8).numpy(), x)
  np.testing.assert_array_equal(ref.solarize(x, 256).numpy(), x)
  np.testing.assert_array_equal(ref.solarize_add(x, 0).numpy(), x)
  for op in (ref.color, ref.contrast, ref.brightness, ref.sharpness):
    np.testing.assert_array_equal(op(x, 1.0).numpy(), x)
  for op in (ref.rotate, ref.shear_x, ref.shear_y, ref.translate_x, ref.translate_y):
    np.testing.assert_array_equal(op(x, 0.0).numpy(), x)
  np.testing.assert_array_equal(ref.cutout(x, 0, [1, 2]).numpy(), x)
