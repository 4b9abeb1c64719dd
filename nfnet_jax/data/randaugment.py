"""RandAugment (Cubuk et al., 2020) as the NFNet training recipe uses it, in core TensorFlow.

In the NFNet recipe RandAugment runs *after* MixUp/CutMix (nfnet-spec section 3): the
pipeline mixes each per-device batch, rounds the mixed images to uint8 [H, W, 3] and
augments them one by one inside ``tf.data.Dataset.map``. ``randaugment(image, seed, num_layers=N, magnitude=m)`` applies N layers
(4 in the recipe); each layer draws one of the 16 ops below uniformly at random and
*always* applies it (there is no per-op application probability), at the same
magnitude m for every layer. Geometric ops and Cutout fill uncovered pixels with grey
128 (RGB (128, 128, 128)).

Magnitude -> argument (m is a float >= 0; the paper's scale has m = 10 as "full
strength", NFNet variants use m of 10 to 20; ``op_arguments`` implements this table):

  ==============  =============================  =====================================
  op              argument                       m = 10 / m = 15
  ==============  =============================  =====================================
  AutoContrast    none                           -
  Equalize        none                           -
  Invert          none                           -
  Rotate          +-(m/10 * 30) degrees          +-30 / +-45
  Posterize       bits = int(m/10 * 4)           4 / 6
  Solarize        threshold = int(m/10 * 256)    256 / 384 (both: no change)
  Color           factor = m/10 * 1.8 + 0.1      1.9 / 2.8
  Contrast        factor = m/10 * 1.8 + 0.1      1.9 / 2.8
  Brightness      factor = m/10 * 1.8 + 0.1      1.9 / 2.8
  Sharpness       factor = m/10 * 1.8 + 0.1      1.9 / 2.8
  ShearX/ShearY   level = +-(m/10 * 0.3)         +-0.3 / +-0.45
  TranslateX/Y    pixels = +-(m/10 * 100)        +-100 / +-150
  Cutout          half side = int(m/10 * 40)     40 / 60
  SolarizeAdd     addition = int(m/10 * 110)     110 / 165 (threshold 128)
  ==============  =============================  =====================================

"+-" means the sign is drawn uniformly per application. Two quirks of this (reference)
mapping are kept on purpose: Posterize keeps fewer bits at *small* m (bits = 0 for
m < 2.5, which turns the image black) and none at m >= 20 (bits >= 8: unchanged), and
Solarize's threshold reaches 256 at m = 10, so from m = 10 up Solarize leaves the image
unchanged.

Every op follows the Pillow function it is named after (``PIL.ImageOps`` /
``PIL.ImageEnhance`` / ``Image.transform`` with NEAREST resampling), which the tests
check pixel by pixel; see each op's docstring for the exact semantics. Randomness comes
only from ``tf.random.stateless_*`` ops keyed by the caller's seed, so the same
(image, seed) always gives the same output, however tf.data schedules the map calls.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import tensorflow as tf

NUM_OPS = 16
OP_NAMES: tuple[str, ...] = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
    'TranslateY', 'Cutout', 'SolarizeAdd',
)
# Ops whose argument gets a random sign each time they are applied.
SIGNED_OPS: frozenset[str] = frozenset(
    {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'})
FILL_VALUE = 128

assert len(OP_NAMES) == NUM_OPS


def _check_image(image: Any, name: str = 'image') -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(
        f'{name} must be uint8 with values 0..255, got dtype {image.dtype.name}; '
        'augment before normalising, or convert with '
        'tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).')
  shape = image.shape
  if shape.rank != 3 or shape[-1] != 3:
    raise ValueError(
        f'{name} must have static shape [H, W, 3] (one RGB image), got {shape}; '
        'apply RandAugment per example (before batching) and, if the shape is unknown '
        'inside tf.data, declare it with image.set_shape([None, None, 3]).')
  return image


def _check_seed(seed: Any) -> tf.Tensor:
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or not seed.shape.is_compatible_with([2]):
    raise ValueError(
        f'seed must be an int32/int64 tensor of shape [2], got {seed.dtype.name} '
        f'{seed.shape}; derive one per example, e.g. with '
        'tf.random.experimental.stateless_split or stateless_fold_in.')
  return seed


def _to_uint8(x: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  """Clips to 0..255 and truncates to uint8, like Pillow's float -> UINT8 stores."""
  x = tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8)
  x.set_shape(like.shape)
  return x


def _apply_luts(image: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
  """Maps channel c through luts[c] (int32 [3, 256]), like ``Image.point``."""
  flat_index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  return _to_uint8(tf.gather(tf.reshape(luts, [-1]), flat_index), image)


# ---------------------------------------------------------------- pixel ops


def auto_contrast(image: Any) -> tf.Tensor:
  """Per-channel ``PIL.ImageOps.autocontrast(image)`` (cutoff 0).

  Each channel's [min, max] is stretched to [0, 255] through Pillow's lookup table
  ``int(i * scale + offset)`` with ``scale = 255.0 / (max - min)``, ``offset = -min *
  scale``, evaluated in float64 exactly as Pillow does. That double-precision rounding
  occasionally maps a value one below the exact integer rescale (e.g. max -> 254 for
  [0, 25]); we keep it so the op is bit-identical to Pillow. A channel with max == min
  is left unchanged.

  Args:
    image: uint8 [H, W, 3].

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  pixels = tf.reshape(image, [-1, 3])
  lo = tf.cast(tf.reduce_min(pixels, axis=0), tf.float64)[:, None]
  hi = tf.cast(tf.reduce_max(pixels, axis=0), tf.float64)[:, None]
  # The guard only keeps the unused branch of the where below finite.
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  levels = tf.range(256, dtype=tf.float64)[None, :]
  stretched = tf.clip_by_value(levels * scale + offset, 0.0, 255.0)
  luts = tf.where(hi > lo, stretched, levels)
  return _apply_luts(image, tf.cast(luts, tf.int32))


def equalize(image: Any) -> tf.Tensor:
  """Per-channel histogram equalisation, as ``PIL.ImageOps.equalize``.

  For each channel with histogram h: step = (count - h[last non-empty bin]) // 255;
  if step == 0 the channel is unchanged, else value i maps to
  min(255, (step // 2 + sum(h[:i])) // step).

  Args:
    image: uint8 [H, W, 3].

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  flat_index = tf.reshape(
      tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32), [-1])
  hist = tf.reshape(
      tf.math.bincount(flat_index, minlength=768, maxlength=768, dtype=tf.int32),
      [3, 256])
  count = tf.reduce_sum(hist, axis=1)
  last_bin = 255 - tf.argmax(tf.reverse(hist, [1]) > 0, axis=1, output_type=tf.int32)
  last_count = tf.gather(hist, last_bin, batch_dims=1)
  step = (count - last_count) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  cumulative = tf.cumsum(hist, axis=1, exclusive=True)
  equalized = tf.minimum((safe_step // 2 + cumulative) // safe_step, 255)
  identity = tf.broadcast_to(tf.range(256, dtype=tf.int32)[None, :], [3, 256])
  luts = tf.where(step[:, None] > 0, equalized, identity)
  return _apply_luts(image, luts)


def invert(image: Any) -> tf.Tensor:
  """255 - x, as ``PIL.ImageOps.invert``."""
  image = _check_image(image)
  return 255 - image


def posterize(image: Any, bits: Any) -> tf.Tensor:
  """Keeps the top ``bits`` bits of every value: x & ~(2**(8 - bits) - 1).

  As ``PIL.ImageOps.posterize``. ``bits`` is clipped to [0, 8]: 0 gives an all-black
  image, 8 leaves the image unchanged.

  Args:
    image: uint8 [H, W, 3].
    bits: int or int scalar tensor.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image: Any, threshold: Any) -> tf.Tensor:
  """Inverts values >= threshold, as ``PIL.ImageOps.solarize``.

  Args:
    image: uint8 [H, W, 3].
    threshold: int or int scalar tensor; 256 or more leaves the image unchanged.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  # Compared in int32 because thresholds of 256 and up do not fit in uint8.
  threshold = tf.cast(threshold, tf.int32)
  return tf.where(tf.cast(image, tf.int32) >= threshold, 255 - image, image)


def solarize_add(image: Any, addition: Any, threshold: Any = 128) -> tf.Tensor:
  """Adds ``addition`` to values below ``threshold``, clipping at 255.

  Values >= threshold are unchanged. (No Pillow counterpart; from the reference
  AutoAugment/RandAugment op set.)

  Args:
    image: uint8 [H, W, 3].
    addition: int or int scalar tensor.
    threshold: int or int scalar tensor.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  values = tf.cast(image, tf.int32)
  added = values + tf.cast(addition, tf.int32)
  out = tf.where(values < tf.cast(threshold, tf.int32), added, values)
  return _to_uint8(out, image)


# ---------------------------------------------------------------- enhance ops


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: Any) -> tf.Tensor:
  """Pillow's ``Image.blend(degenerate, image, factor)``.

  Pillow computes ``in1 + alpha * (in2 - in1)`` in C float (float32) and truncates
  into 0..255; doing the same float32 operations in the same order reproduces it bit
  for bit (checked against Pillow in the tests).
  """
  factor = tf.cast(factor, tf.float32)
  degenerate = tf.cast(degenerate, tf.float32)
  blended = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return _to_uint8(blended, image)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point), int32."""
  rgb = tf.cast(image, tf.int32)
  luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  return tf.bitwise.right_shift(luma, 16)


def color(image: Any, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Color(image).enhance(factor)``: blend with the greyscale image.

  Args:
    image: uint8 [H, W, 3].
    factor: float or float scalar tensor; 0 gives greyscale, 1 the image unchanged.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  return _blend(_grayscale(image)[..., None], image, factor)


def contrast(image: Any, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Contrast(image).enhance(factor)``: blend with the mean grey.

  The grey level is Pillow's: the mean of the greyscale (L) image rounded as
  int(mean + 0.5), computed here exactly in integers.

  Args:
    image: uint8 [H, W, 3].
    factor: float or float scalar tensor; 0 gives flat grey, 1 the image unchanged.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  total = tf.reduce_sum(tf.cast(_grayscale(image), tf.int64))
  count = tf.cast(tf.size(image) // 3, tf.int64)
  mean = (2 * total + count) // tf.maximum(2 * count, 1)
  return _blend(mean, image, factor)


def brightness(image: Any, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Brightness(image).enhance(factor)``: blend with black.

  Args:
    image: uint8 [H, W, 3].
    factor: float or float scalar tensor; 0 gives black, 1 the image unchanged.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  return _blend(tf.zeros([], tf.uint8), image, factor)


def sharpness(image: Any, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Sharpness(image).enhance(factor)``: blend with a smoothed image.

  The smoothed image is Pillow's ``ImageFilter.SMOOTH``: the 3x3 kernel
  [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 rounded to the nearest integer on interior
  pixels, and the one-pixel border copied from the input (so the border is unchanged
  for every factor, and images less than 3 pixels high or wide are returned as is).

  Args:
    image: uint8 [H, W, 3].
    factor: float or float scalar tensor; 0 gives the smoothed image, 1 the image
      unchanged, > 1 sharpens.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  x = tf.cast(image, tf.float32)
  # Separable 3x3 box sum over the interior, plus 4x the centre for the kernel's 5.
  # Python-style slices give empty (not negative-sized) results for tiny images.
  rows = x[:-2] + x[1:-1] + x[2:]
  centre = x[1:-1, 1:-1]
  sums = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * centre
  # Integer sums up to 13 * 255 are exact in float32, and sums / 13 is never within
  # 1/26 of a .5 tie, so this rounding is exact (and half-to-even cannot matter).
  smoothed = tf.round(sums / 13)
  interior = _blend(smoothed, image[1:-1, 1:-1], factor)
  # The border blends with itself, i.e. stays as it is: paste the interior back.
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  middle = image[1:-1]
  middle = tf.concat(
      [middle[:, :1], interior, middle[:, tf.maximum(width - 1, 1):]], axis=1)
  out = tf.concat([image[:1], middle, image[tf.maximum(height - 1, 1):]], axis=0)
  out.set_shape(image.shape)
  return out


# ---------------------------------------------------------------- geometric ops


def _affine(image: tf.Tensor, matrix: tuple[Any, ...]) -> tf.Tensor:
  """Pillow's ``Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=128)``.

  Pillow maps output pixel (x, y) to input point (a x + b y + c, d x + e y + f) in
  *edge* coordinates (pixel i spans [i, i + 1)), samples at the pixel centre
  (x + 0.5, y + 0.5) and takes the pixel containing that point.
  ImageProjectiveTransform works on pixel indices (pixel i is the point i) and rounds
  to the nearest index, so the same matrix needs its offsets moved by half a pixel:
  c' = c + (a + b - 1) / 2, f' = f + (d + e - 1) / 2. The two then agree except on
  exact ties, which they break differently (see the tests).
  """
  a, b, c, d, e, f = (tf.cast(v, tf.float64) for v in matrix)
  zero = tf.constant(0.0, tf.float64)
  transform = tf.stack([
      a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), zero, zero])
  transform = tf.cast(transform, tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(FILL_VALUE, tf.float32), interpolation='NEAREST',
      fill_mode='CONSTANT')[0]
  out.set_shape(image.shape)
  return out


def rotate(image: Any, degrees: Any) -> tf.Tensor:
  """Rotates about the image centre, as ``Image.rotate(degrees, NEAREST, fillcolor=128)``.

  Positive angles rotate counter-clockwise as displayed (Pillow's convention), the
  output keeps the input size, and uncovered pixels are grey 128.

  Args:
    image: uint8 [H, W, 3].
    degrees: float or float scalar tensor.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  # The matrix is built in float64 (as Pillow does) and only the result is rounded.
  theta = tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(theta), tf.sin(theta)
  shape = tf.cast(tf.shape(image), tf.float64)
  cx, cy = shape[1] / 2, shape[0] / 2
  # Output point p samples R(theta) (p - centre) + centre, in Pillow's edge coordinates.
  matrix = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
  return _affine(image, matrix)


def shear_x(image: Any, level: Any) -> tf.Tensor:
  """Output (x, y) samples input (x + level * y, y): Pillow AFFINE (1, level, 0, 0, 1, 0).

  Args:
    image: uint8 [H, W, 3].
    level: float or float scalar tensor.

  Returns:
    uint8 [H, W, 3], grey 128 where the source is outside the image.
  """
  image = _check_image(image)
  return _affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0))


def shear_y(image: Any, level: Any) -> tf.Tensor:
  """Output (x, y) samples input (x, y + level * x): Pillow AFFINE (1, 0, 0, level, 1, 0).

  Args:
    image: uint8 [H, W, 3].
    level: float or float scalar tensor.

  Returns:
    uint8 [H, W, 3], grey 128 where the source is outside the image.
  """
  image = _check_image(image)
  return _affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0))


def translate_x(image: Any, pixels: Any) -> tf.Tensor:
  """Output (x, y) samples input (x + pixels, y): Pillow AFFINE (1, 0, pixels, 0, 1, 0).

  Positive ``pixels`` moves the content left.

  Args:
    image: uint8 [H, W, 3].
    pixels: float or float scalar tensor.

  Returns:
    uint8 [H, W, 3], grey 128 where the source is outside the image.
  """
  image = _check_image(image)
  return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image: Any, pixels: Any) -> tf.Tensor:
  """Output (x, y) samples input (x, y + pixels): Pillow AFFINE (1, 0, 0, 0, 1, pixels).

  Positive ``pixels`` moves the content up.

  Args:
    image: uint8 [H, W, 3].
    pixels: float or float scalar tensor.

  Returns:
    uint8 [H, W, 3], grey 128 where the source is outside the image.
  """
  image = _check_image(image)
  return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def cutout(image: Any, pad_size: Any, seed: Any) -> tf.Tensor:
  """Fills a square of side 2 * pad_size, clipped to the image, with grey 128.

  The centre (cy, cx) is uniform over the pixels of the image, drawn from ``seed``;
  the filled box is rows [cy - pad_size, cy + pad_size) x columns
  [cx - pad_size, cx + pad_size). pad_size 0 leaves the image unchanged.

  Args:
    image: uint8 [H, W, 3].
    pad_size: int or int scalar tensor.
    seed: stateless random seed, int32/int64 [2].

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  seed = _check_seed(seed)
  shape = tf.shape(image)
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cy = tf.random.stateless_uniform([], seed_y, 0, shape[0], tf.int32)
  cx = tf.random.stateless_uniform([], seed_x, 0, shape[1], tf.int32)
  pad_size = tf.cast(pad_size, tf.int32)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  inside = ((rows >= cy - pad_size) & (rows < cy + pad_size)
            & (cols >= cx - pad_size) & (cols < cx + pad_size))
  return tf.where(inside, tf.constant(FILL_VALUE, tf.uint8), image)


# ---------------------------------------------------------------- RandAugment


def _check_magnitude(magnitude: Any) -> float:
  if isinstance(magnitude, bool) or not isinstance(magnitude, numbers.Real):
    raise ValueError(
        f'magnitude must be a Python number, got {type(magnitude).__name__}; it is a '
        'fixed hyperparameter (e.g. 10 or 15), pass it as a float.')
  if not magnitude >= 0:
    raise ValueError(
        f'magnitude must be >= 0, got {magnitude}; RandAugment magnitudes are '
        'non-negative (m = 10 is the paper\'s full strength, NFNets use 10..20).')
  return float(magnitude)


def op_arguments(magnitude: float) -> dict[str, float | int | None]:
  """The unsigned argument of every op at ``magnitude`` (see the module docstring).

  Args:
    magnitude: m >= 0, a Python number.

  Returns:
    {op name: argument} for the 16 names in ``OP_NAMES``; None for the ops without an
    argument. Ops in ``SIGNED_OPS`` get a random sign when applied.

  Raises:
    ValueError: if magnitude is negative or not a number.
  """
  m = _check_magnitude(magnitude) / 10
  factor = m * 1.8 + 0.1
  return {
      'AutoContrast': None,
      'Equalize': None,
      'Invert': None,
      'Rotate': m * 30,
      'Posterize': min(int(m * 4), 8),
      'Solarize': int(m * 256),
      'Color': factor,
      'Contrast': factor,
      'Brightness': factor,
      'Sharpness': factor,
      'ShearX': m * 0.3,
      'ShearY': m * 0.3,
      'TranslateX': m * 100,
      'TranslateY': m * 100,
      'Cutout': int(m * 40),
      'SolarizeAdd': int(m * 110),
  }


def apply_op(image: Any, op_index: Any, magnitude: float, seed: Any) -> tf.Tensor:
  """Applies op ``OP_NAMES[op_index]`` at ``magnitude``; only that op is executed.

  Args:
    image: uint8 [H, W, 3].
    op_index: int scalar (tensor) in [0, NUM_OPS).
    magnitude: m >= 0, a Python number.
    seed: stateless random seed, int32/int64 [2]; draws the sign of signed ops and the
      Cutout position.

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: on a bad image or magnitude.
  """
  image = _check_image(image)
  args = op_arguments(magnitude)
  seed = _check_seed(seed)
  sign_seed, cutout_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5,
                  tf.constant(-1.0, tf.float64), tf.constant(1.0, tf.float64))

  def signed(name: str) -> tf.Tensor:
    return sign * args[name]

  branches: dict[str, Callable[[], tf.Tensor]] = {
      'AutoContrast': lambda: auto_contrast(image),
      'Equalize': lambda: equalize(image),
      'Invert': lambda: invert(image),
      'Rotate': lambda: rotate(image, signed('Rotate')),
      'Posterize': lambda: posterize(image, args['Posterize']),
      'Solarize': lambda: solarize(image, args['Solarize']),
      'Color': lambda: color(image, args['Color']),
      'Contrast': lambda: contrast(image, args['Contrast']),
      'Brightness': lambda: brightness(image, args['Brightness']),
      'Sharpness': lambda: sharpness(image, args['Sharpness']),
      'ShearX': lambda: shear_x(image, signed('ShearX')),
      'ShearY': lambda: shear_y(image, signed('ShearY')),
      'TranslateX': lambda: translate_x(image, signed('TranslateX')),
      'TranslateY': lambda: translate_y(image, signed('TranslateY')),
      'Cutout': lambda: cutout(image, args['Cutout'], cutout_seed),
      'SolarizeAdd': lambda: solarize_add(image, args['SolarizeAdd']),
  }
  out = tf.switch_case(
      tf.cast(op_index, tf.int32), [branches[name] for name in OP_NAMES])
  out.set_shape(image.shape)
  return out


def randaugment(image: Any, seed: Any, *, num_layers: int, magnitude: float) -> tf.Tensor:
  """RandAugment: ``num_layers`` ops, each uniform over the 16, at ``magnitude``.

  Works eagerly and inside ``tf.data.Dataset.map`` / ``tf.function``; the output is a
  deterministic function of (image, seed).

  Args:
    image: uint8 [H, W, 3] (H and W may be dynamic).
    seed: stateless random seed, int32/int64 [2], e.g. one per example from
      ``tf.random.experimental.stateless_split``.
    num_layers: N >= 0 (4 in the NFNet recipe); 0 returns the image unchanged.
    magnitude: m >= 0, a Python number (see the module docstring).

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: on a bad image, num_layers or magnitude.
  """
  image = _check_image(image)
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(
        f'num_layers must be an int >= 0, got {num_layers!r}; the NFNet recipe uses 4 '
        '(0 disables RandAugment).')
  _check_magnitude(magnitude)
  if num_layers == 0:
    return image
  seed = _check_seed(seed)
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    choice_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 2))
    op_index = tf.random.stateless_uniform([], choice_seed, 0, NUM_OPS, tf.int32)
    image = apply_op(image, op_index, magnitude, op_seed)
  return image
