"""Tests for nfnet_jax.data.randaugment, each op checked against Pillow and/or NumPy.

The references here are written independently of the implementation: Pillow's own
ImageOps / ImageEnhance / Image.transform where Pillow has the op, plain NumPy where it
does not (SolarizeAdd, Cutout, 0-bit Posterize).
"""
from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter
from PIL import ImageOps
import pytest
import tensorflow as tf

from nfnet_jax.data import randaugment as ra

GREY = (128, 128, 128)
SIZES = [(17, 23), (32, 32)]  # Odd and even, non-square and square.
_settings = hypothesis.settings(max_examples=25, deadline=None)


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


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
  assert near_boundary.all(), list(zip(ys[~near_boundary], xs[~near_boundary]))


def _pil_rotate_matrix(degrees, width, height):
  """Pillow's matrix for Image.rotate about (w/2, h/2), written out from its definition."""
  t = np.deg2rad(degrees)
  cx, cy = width / 2, height / 2
  # Image.rotate builds its inverse map from -angle: output p samples R(t)(p - c) + c.
  return (np.cos(t), -np.sin(t), cx - np.cos(t) * cx + np.sin(t) * cy,
          np.sin(t), np.cos(t), cy - np.sin(t) * cx - np.cos(t) * cy)


def _factor(m):
  return m / 10 * 1.8 + 0.1


# ---------------------------------------------------------------- mapping


def test_op_names():
  assert ra.NUM_OPS == 16 == len(ra.OP_NAMES) == len(set(ra.OP_NAMES))
  # The order is part of the API: op indices are drawn against it.
  assert ra.OP_NAMES == (
      'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color',
      'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
      'TranslateY', 'Cutout', 'SolarizeAdd')
  assert ra.SIGNED_OPS == {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'}


@pytest.mark.parametrize('m, want', [
    (10, dict(Rotate=30, Posterize=4, Solarize=256, Color=1.9, ShearX=0.3,
              TranslateX=100, Cutout=40, SolarizeAdd=110)),
    (15, dict(Rotate=45, Posterize=6, Solarize=384, Color=2.8, ShearX=0.45,
              TranslateX=150, Cutout=60, SolarizeAdd=165)),
    (5, dict(Rotate=15, Posterize=2, Solarize=128, Color=1.0, ShearX=0.15,
             TranslateX=50, Cutout=20, SolarizeAdd=55)),
    (2, dict(Rotate=6, Posterize=0, Solarize=51, Color=0.46, ShearX=0.06,
             TranslateX=20, Cutout=8, SolarizeAdd=22)),
    (25, dict(Posterize=8)),  # int(10) bits, clipped to 8.
])
def test_op_arguments(m, want):
  args = ra.op_arguments(m)
  assert set(args) == set(ra.OP_NAMES)
  for name in ('AutoContrast', 'Equalize', 'Invert'):
    assert args[name] is None
  for name in ('Contrast', 'Brightness', 'Sharpness'):
    assert args[name] == args['Color']
  assert args['ShearY'] == args['ShearX'] and args['TranslateY'] == args['TranslateX']
  for name, value in want.items():
    assert args[name] == pytest.approx(value, abs=1e-12), name
    if name in ('Posterize', 'Solarize', 'Cutout', 'SolarizeAdd'):
      assert isinstance(args[name], int)


# ---------------------------------------------------------------- pixel ops


@pytest.mark.parametrize('size', SIZES)
def test_invert(size):
  x = _image(*size)
  got = ra.invert(x).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.invert(_pil(x))))
  np.testing.assert_array_equal(got, 255 - x)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [5, 10, 15])
def test_posterize(size, m):
  x = _image(*size)
  bits = int(m / 10 * 4)
  got = ra.posterize(x, bits).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.posterize(_pil(x), bits)))


def test_posterize_all_bits():
  x = _image(9, 11)
  for bits in range(0, 9):
    np.testing.assert_array_equal(
        ra.posterize(x, bits).numpy(), x & np.uint8((0xFF << (8 - bits)) & 0xFF))
  # Pillow rejects 0 bits; the mapping yields it for m < 2.5 and it means black.
  np.testing.assert_array_equal(ra.posterize(x, 0).numpy(), np.zeros_like(x))
  np.testing.assert_array_equal(ra.posterize(x, 12).numpy(), x)
  np.testing.assert_array_equal(ra.posterize(x, -3).numpy(), np.zeros_like(x))


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [3, 5, 10, 15])
def test_solarize(size, m):
  x = _image(*size)
  threshold = int(m / 10 * 256)
  got = ra.solarize(x, threshold).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.solarize(_pil(x), threshold)))
  np.testing.assert_array_equal(got, np.where(x >= threshold, 255 - x, x))


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [3, 10, 15])
def test_solarize_add(size, m):
  x = _image(*size)
  addition = int(m / 10 * 110)
  want = np.where(x < 128, np.minimum(x.astype(int) + addition, 255), x)
  np.testing.assert_array_equal(ra.solarize_add(x, addition).numpy(), want)
  want = np.where(x < 200, np.minimum(x.astype(int) + 7, 255), x)
  np.testing.assert_array_equal(ra.solarize_add(x, 7, threshold=200).numpy(), want)


def _test_images():
  """Random images plus ones that exercise the special cases of the histogram ops."""
  rng = np.random.default_rng(1)
  images = [_image(*size) for size in SIZES]
  # Few distinct levels: small equalize steps (lut values that need clipping).
  images.append(rng.choice(np.array([3, 40, 41, 200], np.uint8), (17, 23, 3)))
  # A constant channel (autocontrast/equalize leave it alone) next to varied ones.
  x = _image(16, 16, seed=2)
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
  got = ra.auto_contrast(x).numpy()
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
  assert ra.auto_contrast(x).numpy()[0, 0, 0] == _np(ImageOps.autocontrast(_pil(x)))[0, 0, 0]


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
  got = ra.equalize(x).numpy()
  np.testing.assert_array_equal(got, _np(ImageOps.equalize(_pil(x))))
  np.testing.assert_array_equal(got, _numpy_equalize(x))


@_settings
@hypothesis.given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12),
                                                 st.just(3)),
                             elements=st.sampled_from([0, 1, 2, 60, 128, 254, 255])
                             | st.integers(0, 255)))
def test_histogram_ops_match_pillow_property(x):
  np.testing.assert_array_equal(ra.equalize(x).numpy(), _np(ImageOps.equalize(_pil(x))))
  np.testing.assert_array_equal(
      ra.auto_contrast(x).numpy(), _np(ImageOps.autocontrast(_pil(x))))


# ---------------------------------------------------------------- enhance ops

_ENHANCERS = {
    'color': (ra.color, ImageEnhance.Color),
    'contrast': (ra.contrast, ImageEnhance.Contrast),
    'brightness': (ra.brightness, ImageEnhance.Brightness),
    'sharpness': (ra.sharpness, ImageEnhance.Sharpness),
}


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('name', sorted(_ENHANCERS))
@pytest.mark.parametrize('factor', [_factor(10), _factor(15), _factor(3), 0.37, 0.0])
def test_enhance_ops(size, name, factor):
  ours, pillows = _ENHANCERS[name]
  x = _image(*size)
  _check_enhanced(ours(x, factor), pillows(_pil(x)).enhance(factor))


@pytest.mark.parametrize('size', SIZES)
def test_enhance_degenerate_images(size):
  """At factor 0 the blend returns the degenerate image, which is pure integer math."""
  x = _image(*size)
  grey = (x[..., 0].astype(np.int64) * 299 + x[..., 1].astype(np.int64) * 587
          + x[..., 2].astype(np.int64) * 114)
  # ITU-R 601-2 luma, as Pillow documents for convert('L') (to within its rounding).
  assert np.abs(ra.color(x, 0.0).numpy()[..., 0] - grey / 1000).max() <= 1
  np.testing.assert_array_equal(ra.color(x, 0.0).numpy(), _np(_pil(x).convert('L').convert('RGB')))
  np.testing.assert_array_equal(ra.brightness(x, 0.0).numpy(), np.zeros_like(x))
  mean = _np(_pil(x).convert('L')).mean()
  np.testing.assert_array_equal(
      ra.contrast(x, 0.0).numpy(), np.full_like(x, int(mean + 0.5)))
  smooth = _np(_pil(x).filter(ImageFilter.SMOOTH))
  np.testing.assert_array_equal(ra.sharpness(x, 0.0).numpy(), smooth)
  # And independently of Pillow: rounded 3x3 smoothing inside, border kept.
  xi = x.astype(np.int64)
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
  acc = sum(kernel[i, j] * xi[i:i + size[0] - 2, j:j + size[1] - 2]
            for i in range(3) for j in range(3))
  want = x.copy()
  want[1:-1, 1:-1] = np.floor(acc / 13 + 0.5)
  np.testing.assert_array_equal(ra.sharpness(x, 0.0).numpy(), want)


@pytest.mark.parametrize('size', [(1, 1), (2, 5), (1, 7), (5, 2), (3, 3), (3, 8), (6, 3)])
def test_sharpness_small_images(size):
  x = _image(*size)
  got = ra.sharpness(x, 2.8).numpy()
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
  x = _image(*size)
  got = ra.rotate(x, degrees).numpy()
  want = _pil(x).rotate(degrees, resample=Image.NEAREST, fillcolor=GREY)
  _check_geometric(got, want, _pil_rotate_matrix(degrees, size[1], size[0]))
  # Direction: the opposite Pillow rotation agrees only where both are fill or by chance.
  opposite = _np(_pil(x).rotate(-degrees, resample=Image.NEAREST, fillcolor=GREY))
  assert (got == opposite).all(axis=-1).mean() < 0.5


def test_rotate_quarter_turn_is_counter_clockwise():
  x = _image(16, 16)
  # np.rot90 turns the displayed image counter-clockwise, as Pillow's positive angles.
  np.testing.assert_array_equal(ra.rotate(x, 90.0).numpy(), np.rot90(x, 1))
  np.testing.assert_array_equal(ra.rotate(x, -90.0).numpy(), np.rot90(x, -1))
  np.testing.assert_array_equal(ra.rotate(x, 180.0).numpy(), np.rot90(x, 2))


@pytest.mark.parametrize('size', SIZES + [(48, 64)])
@pytest.mark.parametrize('m', [10, 15, 3])
@pytest.mark.parametrize('sign', [1, -1])
@pytest.mark.parametrize('axis', ['x', 'y'])
def test_shear(size, m, sign, axis):
  x = _image(*size)
  level = sign * m / 10 * 0.3
  op, matrix = ((ra.shear_x, (1, level, 0, 0, 1, 0)) if axis == 'x'
                else (ra.shear_y, (1, 0, 0, level, 1, 0)))
  want = _pil(x).transform((size[1], size[0]), Image.AFFINE, matrix,
                           resample=Image.NEAREST, fillcolor=GREY)
  _check_geometric(op(x, level), want, matrix)


@pytest.mark.parametrize('size', SIZES + [(160, 200)])
@pytest.mark.parametrize('m', [10, 15, 0.3, 0.77])
@pytest.mark.parametrize('sign', [1, -1])
@pytest.mark.parametrize('axis', ['x', 'y'])
def test_translate(size, m, sign, axis):
  x = _image(*size)
  pixels = sign * m / 10 * 100
  op, matrix = ((ra.translate_x, (1, 0, pixels, 0, 1, 0)) if axis == 'x'
                else (ra.translate_y, (1, 0, 0, 0, 1, pixels)))
  got = op(x, pixels).numpy()
  want = _pil(x).transform((size[1], size[0]), Image.AFFINE, matrix,
                           resample=Image.NEAREST, fillcolor=GREY)
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


def _numpy_cutout(x, pad, cy, cx):
  out = x.copy()
  out[max(cy - pad, 0):max(cy + pad, 0), max(cx - pad, 0):max(cx + pad, 0)] = 128
  return out


def _cutout_centres(got, x, pad):
  """All centres (cy, cx) for which the NumPy cutout equals ``got``."""
  h, w = x.shape[:2]
  return [(cy, cx) for cy in range(h) for cx in range(w)
          if np.array_equal(got, _numpy_cutout(x, pad, cy, cx))]


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('m', [1, 2])
def test_cutout(size, m):
  # Small m: the recipe's pads (40+) would grey out these small test images entirely.
  x = _image(*size)
  pad = int(m / 10 * 40)
  centres = set()
  for i in range(40):
    got = ra.cutout(x, pad, tf.constant([i, 7], tf.int32)).numpy()
    matches = _cutout_centres(got, x, pad)
    assert matches, f'seed {i}: not a {2 * pad}-pixel cutout of the image'
    centres.add(matches[0])
  # Centres spread over the image (40 draws from 391 or 1024 positions).
  assert len(centres) >= 30
  rows = [cy for cy, _ in centres]
  cols = [cx for _, cx in centres]
  assert min(rows) < size[0] / 3 and max(rows) > 2 * size[0] / 3
  assert min(cols) < size[1] / 3 and max(cols) > 2 * size[1] / 3


def test_cutout_clips_at_corners_and_is_deterministic():
  x = _image(12, 12)
  seed = tf.constant([3, 4], tf.int64)
  a, b = ra.cutout(x, 5, seed).numpy(), ra.cutout(x, 5, seed).numpy()
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ra.cutout(x, 0, seed).numpy(), x)
  np.testing.assert_array_equal(ra.cutout(x, 40, seed).numpy(), np.full_like(x, 128))
  # Seen over many seeds, some boxes are clipped by an edge and some lie inside.
  sizes = {int((ra.cutout(x, 3, tf.constant([i, 0])).numpy() != x).any(-1).sum())
           for i in range(60)}
  assert 36 in sizes and min(sizes) < 30


# ---------------------------------------------------------------- properties

_images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 10), st.integers(1, 10), st.just(3)))


@_settings
@hypothesis.given(_images, st.floats(0, 3), st.floats(-60, 60), st.integers(-20, 20))
def test_ops_preserve_dtype_shape_and_range(x, factor, value, int_value):
  outputs = [
      ra.auto_contrast(x), ra.equalize(x), ra.invert(x), ra.rotate(x, value),
      ra.posterize(x, int_value), ra.solarize(x, int_value * 15),
      ra.color(x, factor), ra.contrast(x, factor), ra.brightness(x, factor),
      ra.sharpness(x, factor), ra.shear_x(x, value / 60), ra.shear_y(x, value / 60),
      ra.translate_x(x, value), ra.translate_y(x, value),
      ra.cutout(x, abs(int_value), tf.constant([int_value, 1])),
      ra.solarize_add(x, int_value * 15),
  ]
  assert len(outputs) == ra.NUM_OPS
  for out in outputs:
    assert out.dtype == tf.uint8 and out.shape == x.shape


@_settings
@hypothesis.given(_images)
def test_identities(x):
  np.testing.assert_array_equal(ra.invert(ra.invert(x)).numpy(), x)
  np.testing.assert_array_equal(ra.posterize(x, 8).numpy(), x)
  np.testing.assert_array_equal(ra.solarize(x, 256).numpy(), x)
  np.testing.assert_array_equal(ra.solarize_add(x, 0).numpy(), x)
  for op in (ra.color, ra.contrast, ra.brightness, ra.sharpness):
    np.testing.assert_array_equal(op(x, 1.0).numpy(), x)
  for op in (ra.rotate, ra.shear_x, ra.shear_y, ra.translate_x, ra.translate_y):
    np.testing.assert_array_equal(op(x, 0.0).numpy(), x)
  np.testing.assert_array_equal(ra.cutout(x, 0, [1, 2]).numpy(), x)


@_settings
@hypothesis.given(_images, st.floats(0, 20), st.integers(0, 2**31 - 1))
def test_randaugment_deterministic_and_valid(x, magnitude, seed):
  seed = tf.constant([seed, 17], tf.int64)
  a = ra.randaugment(x, seed, num_layers=2, magnitude=magnitude).numpy()
  b = ra.randaugment(x, seed, num_layers=2, magnitude=magnitude).numpy()
  assert a.dtype == np.uint8 and a.shape == x.shape
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ra.randaugment(x, seed, num_layers=0, magnitude=magnitude), x)


def test_randaugment_seeds_differ():
  # Large enough, at a low enough magnitude, that translations and cutouts do not
  # grey out the whole image (which would make different op choices collide).
  x = _image(64, 64)
  outputs = {ra.randaugment(x, tf.constant([i, 0]), num_layers=4, magnitude=5).numpy()
             .tobytes() for i in range(12)}
  assert len(outputs) >= 11


def test_op_choice_is_uniform_and_per_layer(monkeypatch):
  chosen = []

  def record(image, op_index, magnitude, seed):
    del magnitude, seed
    chosen.append(int(op_index))
    return image

  monkeypatch.setattr(ra, 'apply_op', record)
  x = _image(4, 4)
  for i in range(400):
    ra.randaugment(x, tf.constant([i, 5]), num_layers=4, magnitude=10)
  counts = np.bincount(chosen, minlength=ra.NUM_OPS)
  assert len(counts) == ra.NUM_OPS
  # 1600 draws, 100 expected per op, sd ~9.7: +-40 is beyond 4 sd.
  assert counts.min() >= 60 and counts.max() <= 140, counts
  layers = np.array(chosen).reshape(400, 4)
  # Layers draw independently: repeats of the previous layer's op about 1/16 of the time.
  assert 0.02 < (layers[:, 1:] == layers[:, :-1]).mean() < 0.12


# ---------------------------------------------------------------- apply_op


@pytest.mark.parametrize('op_index', range(16))
def test_apply_op_dispatches_with_mapped_arguments(op_index):
  # Every op visibly changes the image at m = 7 (Solarize does not at m >= 10), and
  # 80 pixels leave content in view after a 70-pixel translation. Values 60..187 leave
  # AutoContrast something to stretch and have pixels on both sides of the thresholds.
  x = _image(80, 80) // 2 + 60
  m = 7
  name = ra.OP_NAMES[op_index]
  args = ra.op_arguments(m)
  signs = set()
  for i in range(8):
    got = ra.apply_op(x, tf.constant(op_index), m, tf.constant([i, 3])).numpy()
    assert not np.array_equal(got, x), name
    if name == 'Cutout':
      assert _cutout_centres(got, x, args['Cutout']), 'not a cutout'
      continue
    op = {'AutoContrast': ra.auto_contrast, 'Equalize': ra.equalize,
          'Invert': ra.invert}.get(name)
    if op is not None:
      np.testing.assert_array_equal(got, op(x).numpy())
      continue
    op = getattr(ra, {'ShearX': 'shear_x', 'ShearY': 'shear_y', 'TranslateX':
                      'translate_x', 'TranslateY': 'translate_y',
                      'SolarizeAdd': 'solarize_add'}.get(name, name.lower()))
    if name in ra.SIGNED_OPS:
      matching = [s for s in (1, -1) if np.array_equal(got, op(x, s * args[name]).numpy())]
      assert len(matching) == 1, name
      signs.add(matching[0])
    else:
      np.testing.assert_array_equal(got, op(x, args[name]).numpy())
  if name in ra.SIGNED_OPS:
    assert signs == {1, -1}


# ---------------------------------------------------------------- tf.data


def test_in_tf_data_map_parallel_and_deterministic():
  images = np.stack([_image(24, 24, seed=i) for i in range(16)])
  base_seed = tf.constant([11, 22], tf.int64)

  def augment(index, image):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return ra.randaugment(image, seed, num_layers=4, magnitude=15)

  def run():
    ds = tf.data.Dataset.from_tensor_slices((np.arange(16, dtype=np.int64), images))
    ds = ds.map(augment, num_parallel_calls=4)
    return next(iter(ds.batch(16))).numpy()

  first, second = run(), run()
  # Parallel graph-mode calls give exactly what one-at-a-time eager calls give.
  eager = np.stack([augment(tf.constant(i, tf.int64), images[i]).numpy() for i in range(16)])
  np.testing.assert_array_equal(first, eager)
  np.testing.assert_array_equal(second, eager)
  assert first.dtype == np.uint8 and first.shape == (16, 24, 24, 3)
  assert sum(not np.array_equal(a, b) for a, b in zip(eager, images)) >= 14


def test_in_tf_data_map_dynamic_shapes():
  sizes = [(9, 13), (20, 7), (16, 16)]

  def gen():
    for i, size in enumerate(sizes):
      yield np.array([i, 0], np.int32), _image(*size, seed=i)

  ds = tf.data.Dataset.from_generator(gen, output_signature=(
      tf.TensorSpec([2], tf.int32), tf.TensorSpec([None, None, 3], tf.uint8)))
  ds = ds.map(lambda seed, image: ra.randaugment(image, seed, num_layers=3, magnitude=12),
              num_parallel_calls=2)
  outputs = list(ds.as_numpy_iterator())
  for i, (size, out) in enumerate(zip(sizes, outputs)):
    assert out.shape == size + (3,) and out.dtype == np.uint8
    want = ra.randaugment(_image(*size, seed=i), tf.constant([i, 0]), num_layers=3,
                          magnitude=12)
    np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize('image, match', [
    (np.zeros((8, 8, 3), np.float32), 'uint8'),
    (np.zeros((2, 8, 8, 3), np.uint8), r'\[H, W, 3\]'),
    (np.zeros((8, 8), np.uint8), r'\[H, W, 3\]'),
    (np.zeros((8, 8, 1), np.uint8), r'\[H, W, 3\]'),
    (np.zeros((8, 8, 4), np.uint8), r'\[H, W, 3\]'),
])
def test_bad_images(image, match):
  with pytest.raises(ValueError, match=match):
    ra.randaugment(image, [1, 2], num_layers=2, magnitude=10)
  with pytest.raises(ValueError, match=match):
    ra.invert(image)
  with pytest.raises(ValueError, match=match):
    ra.apply_op(image, 0, 10, [1, 2])


def test_bad_arguments():
  x = _image(8, 8)
  with pytest.raises(ValueError, match='num_layers'):
    ra.randaugment(x, [1, 2], num_layers=-1, magnitude=10)
  with pytest.raises(ValueError, match='num_layers'):
    ra.randaugment(x, [1, 2], num_layers=2.0, magnitude=10)
  with pytest.raises(ValueError, match='magnitude'):
    ra.randaugment(x, [1, 2], num_layers=2, magnitude=-1)
  with pytest.raises(ValueError, match='magnitude'):
    ra.randaugment(x, [1, 2], num_layers=2, magnitude=float('nan'))
  with pytest.raises(ValueError, match='magnitude'):
    ra.op_arguments(-0.5)
  with pytest.raises(ValueError, match='seed'):
    ra.randaugment(x, [1, 2, 3], num_layers=2, magnitude=10)
  with pytest.raises(ValueError, match='seed'):
    ra.randaugment(x, [1.0, 2.0], num_layers=2, magnitude=10)
  with pytest.raises(ValueError, match='unknown'):
    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8)])
    def unknown_rank(image):
      return ra.randaugment(image, [1, 2], num_layers=1, magnitude=10)
    unknown_rank(x)


# ---------------------------------------------------------------- randaugment_batch
#
# The batched version must equal the per-image one bit for bit: these tests compare the
# two directly (the per-image ops are checked against Pillow above).

_BATCH_MAGNITUDES = [0, 5, 10, 15, 20, 2.3]


def _batch(size, count, seed=0):
  """Images that exercise every op: noise, and smooth gradients of varying ranges.

  Gradients with a narrow range give AutoContrast and Equalize something to change
  (on full-range noise AutoContrast is the identity); mid-range values put pixels on
  both sides of the Solarize / SolarizeAdd thresholds.
  """
  rng = np.random.default_rng(seed)
  height, width = size
  ys, xs = np.mgrid[0:height, 0:width]
  images = []
  for i in range(count):
    if i % 2:
      images.append(rng.integers(0, 256, (height, width, 3)))
    else:
      lo, span = rng.integers(0, 100), rng.integers(20, 156)
      ramp = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1)
      images.append(lo + span * ramp + rng.integers(0, 8, (height, width, 3)))
  return np.clip(np.stack(images), 0, 255).astype(np.uint8)


def _per_image(images, seeds, num_layers, magnitude):
  return np.stack([
      ra.randaugment(image, seed, num_layers=num_layers, magnitude=magnitude).numpy()
      for image, seed in zip(images, seeds)])


@pytest.mark.parametrize('magnitude', _BATCH_MAGNITUDES)
def test_randaugment_batch_equals_per_image(magnitude):
  images = _batch((17, 23), 8, seed=3)
  seeds = np.random.default_rng(4).integers(-2**62, 2**62, (8, 2))
  got = ra.randaugment_batch(images, seeds, num_layers=4, magnitude=magnitude).numpy()
  assert got.dtype == np.uint8 and got.shape == images.shape
  np.testing.assert_array_equal(got, _per_image(images, seeds, 4, magnitude))


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.sampled_from(_BATCH_MAGNITUDES) | st.floats(0, 25),
    num_layers=st.sampled_from([0, 1, 4]),
    batch_size=st.sampled_from([1, 3, 8]),
    size=st.sampled_from([(17, 23), (9, 40), (3, 3)]),
    dtype=st.sampled_from([np.int32, np.int64]))
def test_randaugment_batch_equals_per_image_property(seed, magnitude, num_layers,
                                                      batch_size, size, dtype):
  images = _batch(size, batch_size, seed=seed)
  info = np.iinfo(dtype)
  seeds = np.random.default_rng(seed).integers(info.min, info.max, (batch_size, 2),
                                               dtype=dtype)
  got = ra.randaugment_batch(images, seeds, num_layers=num_layers, magnitude=magnitude)
  np.testing.assert_array_equal(got.numpy(), _per_image(images, seeds, num_layers,
                                                        magnitude))


def _op_seeds_and_draws(count, height, width, seed):
  seeds = tf.constant(np.random.default_rng(seed).integers(-2**62, 2**62, (count, 2)))
  draws = tf.stack([tf.stack([tf.cast(v, tf.int32) for v in ra._op_draws(s, height, width)])
                    for s in tf.unstack(seeds)])
  return seeds, draws


@pytest.mark.parametrize('magnitude', [2.3, 7, 15])
@pytest.mark.parametrize('op_index', range(ra.NUM_OPS))
def test_every_op_batched_equals_apply_op(op_index, magnitude):
  """Each op on a whole batch (the layer helper, every image forced to this op)."""
  name = ra.OP_NAMES[op_index]
  # 48 x 67: large enough that translations at these magnitudes keep some content.
  images = _batch((48, 67), 6, seed=op_index)
  seeds, draws = _op_seeds_and_draws(6, 48, 67, seed=op_index)
  if name in ra.SIGNED_OPS:
    assert set(draws[:, 0].numpy()) == {0, 1}, 'both signs should be exercised'
  got = ra._apply_layer_batch(tf.constant(images), tf.fill([6], op_index), draws,
                              magnitude).numpy()
  want = np.stack([ra.apply_op(image, op_index, magnitude, seed).numpy()
                   for image, seed in zip(images, seeds)])
  np.testing.assert_array_equal(got, want, err_msg=name)
  # Not vacuous: the op changes most images. (AutoContrast leaves full-range noise as
  # it is, Solarize with a high threshold may leave a dark gradient, and from m = 10
  # Solarize is the identity.)
  if not (name == 'Solarize' and magnitude >= 10):
    assert (got != images).any(axis=(1, 2, 3)).sum() >= 3, f'{name} changed too little'


@pytest.mark.parametrize('magnitude', [0, 5, 10, 0.77])
def test_layer_with_every_op_at_once(magnitude):
  """All 16 ops in one layer, each on one image: eagerly, and in graph mode (where
  graph optimisation rewrites some ops) with static shapes and with unknown H and W
  (which computes the pixel maps in the graph and remaps translations instead of
  slicing them); and per image in graph mode."""
  images = _batch((40, 33), ra.NUM_OPS, seed=5)
  seeds, draws = _op_seeds_and_draws(ra.NUM_OPS, 40, 33, seed=6)
  op_indices = tf.range(ra.NUM_OPS)
  want = np.stack([ra.apply_op(images[i], i, magnitude, seeds[i]).numpy()
                   for i in range(ra.NUM_OPS)])
  got = ra._apply_layer_batch(tf.constant(images), op_indices, draws, magnitude)
  np.testing.assert_array_equal(got.numpy(), want)

  def layer(batch):
    return ra._apply_layer_batch(batch, op_indices, draws, magnitude)

  def per_image(batch):
    return tf.map_fn(lambda args: ra.apply_op(args[0], args[1], magnitude, args[2]),
                     (batch, op_indices, seeds), fn_output_signature=tf.uint8)

  for fn in (layer, per_image):
    np.testing.assert_array_equal(tf.function(fn)(images).numpy(), want)
  unknown_shape = tf.function(
      layer, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  np.testing.assert_array_equal(unknown_shape(images).numpy(), want)


def test_geometric_plan_finds_the_shifts():
  # m = 0.77: Rotate (2.3 degrees) and Shear are the identity on 17 x 23 pixels, and a
  # 7.7-pixel translation takes every pixel from 8 pixels away.
  _, shifts = ra._geometric_plan(0.77, 17, 23)
  assert shifts == ((0, 0),) * 4 + (None, None) + ((0, 8), (0, -8), (8, 0), (-8, 0))
  # m = 10: 100-pixel translations leave only fill.
  _, shifts = ra._geometric_plan(10, 17, 23)
  assert shifts[:6] == (None,) * 6 and all(s is not None for s in shifts[6:])
  for shift in [(0, 8), (-8, 0), (17, 0), (0, 0)]:
    x = _image(17, 23)
    got = ra._shift_batch(tf.constant(x[None]), *shift)[0].numpy()
    ys, xs = np.mgrid[0:17, 0:23]
    ys, xs = ys + shift[0], xs + shift[1]
    inside = (ys >= 0) & (ys < 17) & (xs >= 0) & (xs < 23)
    want = np.full_like(x, 128)
    want[inside] = x[ys[inside], xs[inside]]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('drop_remainder', [True, False])
def test_randaugment_batch_in_tf_data(drop_remainder):
  """In Dataset.map over batches (graph mode): static batch size (drop_remainder) and
  dynamic, parallel calls, deterministic, equal to the per-image function."""
  count, batch_size = 11, 4
  images = _batch((24, 20), count, seed=7)
  base_seed = tf.constant([11, 22], tf.int64)

  def augment(index, batch):
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(base_seed, index), tf.shape(batch)[0])
    return ra.randaugment_batch(batch, seeds, num_layers=4, magnitude=15)

  def run():
    ds = tf.data.Dataset.from_tensor_slices(images).batch(
        batch_size, drop_remainder=drop_remainder).enumerate()
    ds = ds.map(augment, num_parallel_calls=2)
    assert ds.element_spec.shape.as_list() == [batch_size if drop_remainder else None,
                                               24, 20, 3]
    return list(ds.as_numpy_iterator())

  first, second = run(), run()
  assert len(first) == (2 if drop_remainder else 3)
  for index, (a, b) in enumerate(zip(first, second)):
    np.testing.assert_array_equal(a, b)
    batch = images[index * batch_size:(index + 1) * batch_size]
    seeds = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(
        base_seed, tf.constant(index, tf.int64)), len(batch))
    np.testing.assert_array_equal(a, _per_image(batch, seeds, 4, 15))


@pytest.mark.parametrize('images, seeds, match', [
    (np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 2), np.int64), 'uint8'),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((1, 2, 8, 8, 3), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((2, 8, 8, 1), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((2, 8, 8, 4), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 3), np.int64), r'seeds .*\[B, 2\]'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2,), np.int64), r'seeds .*\[B, 2\]'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2), np.float32), r'seeds .*int32/int64'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 2), np.int64), 'one row per image'),
])
def test_randaugment_batch_bad_inputs(images, seeds, match):
  with pytest.raises(ValueError, match=match):
    ra.randaugment_batch(images, seeds, num_layers=2, magnitude=10)


def test_randaugment_batch_bad_arguments():
  images, seeds = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2), np.int64)
  for num_layers in (-1, 2.0, True):
    with pytest.raises(ValueError, match='num_layers'):
      ra.randaugment_batch(images, seeds, num_layers=num_layers, magnitude=10)
  for magnitude in (-1, float('nan'), tf.constant(10.0)):
    with pytest.raises(ValueError, match='magnitude'):
      ra.randaugment_batch(images, seeds, num_layers=2, magnitude=magnitude)
  # A batch-size mismatch that only shows at run time is caught there.
  @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.uint8),
                                tf.TensorSpec([None, 2], tf.int64)])
  def dynamic(images, seeds):
    return ra.randaugment_batch(images, seeds, num_layers=2, magnitude=10)
  with pytest.raises(tf.errors.InvalidArgumentError, match='one row per image'):
    dynamic(images, np.zeros((3, 2), np.int64))
  np.testing.assert_array_equal(
      ra.randaugment_batch(images, seeds, num_layers=0, magnitude=10).numpy(), images)
