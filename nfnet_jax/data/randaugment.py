"""RandAugment (Cubuk et al., 2020) as the NFNet training recipe uses it, in core TensorFlow.

In the NFNet recipe RandAugment runs *after* MixUp/CutMix (nfnet-spec section 3): the
pipeline mixes each per-device batch, rounds the mixed images to uint8 and augments
every image with its own seed. ``randaugment(image, seed, num_layers=N, magnitude=m)``
augments one [H, W, 3] image; ``randaugment_batch(images, seeds, ...)`` augments a
[B, H, W, 3] batch with one seed per image and returns exactly what ``randaugment``
returns for each (image, seed), several times faster per image. Each of the N layers
(4 in the recipe) draws one of the 16 ops below uniformly at random and *always*
applies it (there is no per-op application probability), at the same magnitude m for
every layer. Geometric ops and Cutout fill uncovered pixels with grey
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
(image, seed) always gives the same output, however tf.data schedules the map calls,
and whether the image is augmented alone or in a batch.

Each op is implemented once, on a batch (the ``_*_batch`` functions); the per-image
functions run it on a batch of one. ``randaugment_batch`` sends each image of a layer
to its op's sub-batch (``tf.dynamic_partition``), runs each op once on its sub-batch
and puts the results back in place (``tf.dynamic_stitch``), so every image is touched
only by the op it drew. The op arguments depend only on m, so the geometric ops reduce
to 10 fixed pixel maps (5 ops x 2 signs) computed once per (m, H, W).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable

import numpy as np
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

# The signed ops are the geometric ones; the batched path gives each (op, sign) pair a
# pixel map, numbered 2 * (position in this tuple) + (1 if the sign is negative).
_GEOMETRIC_OPS: tuple[str, ...] = tuple(name for name in OP_NAMES if name in SIGNED_OPS)


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
        'augment batches with randaugment_batch and, if the shape is unknown inside '
        'tf.data, declare it with image.set_shape([None, None, 3]).')
  return image


def _check_images(images: Any) -> tf.Tensor:
  images = tf.convert_to_tensor(images)
  if images.dtype != tf.uint8:
    raise ValueError(
        f'images must be uint8 with values 0..255, got dtype {images.dtype.name}; '
        'augment before normalising, or convert with '
        'tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).')
  shape = images.shape
  if shape.rank != 4 or shape[-1] != 3:
    raise ValueError(
        f'images must have static shape [B, H, W, 3] (a batch of RGB images), got '
        f'{shape}; use randaugment for a single image and, if the shape is unknown '
        'inside tf.data, declare it with images.set_shape([None, H, W, 3]).')
  return images


def _check_seed(seed: Any) -> tf.Tensor:
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or not seed.shape.is_compatible_with([2]):
    raise ValueError(
        f'seed must be an int32/int64 tensor of shape [2], got {seed.dtype.name} '
        f'{seed.shape}; derive one per example, e.g. with '
        'tf.random.experimental.stateless_split or stateless_fold_in.')
  return seed


def _check_seeds(seeds: Any, images: tf.Tensor) -> tf.Tensor:
  seeds = tf.convert_to_tensor(seeds)
  if seeds.dtype not in (tf.int32, tf.int64) or not seeds.shape.is_compatible_with(
      [None, 2]):
    raise ValueError(
        f'seeds must be an int32/int64 tensor of shape [B, 2] (one seed per image), '
        f'got {seeds.dtype.name} {seeds.shape}; derive them e.g. with '
        'tf.random.experimental.stateless_split(seed, B).')
  if not seeds.shape[:1].is_compatible_with(images.shape[:1]):
    raise ValueError(
        f'seeds must have one row per image: got {seeds.shape[0]} seeds for a batch '
        f'of {images.shape[0]} images.')
  return seeds


def _check_num_layers(num_layers: Any) -> int:
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(
        f'num_layers must be an int >= 0, got {num_layers!r}; the NFNet recipe uses 4 '
        '(0 disables RandAugment).')
  return num_layers


def _to_uint8(x: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  """Clips to 0..255 and truncates to uint8, like Pillow's float -> UINT8 stores."""
  x = tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8)
  x.set_shape(like.shape)
  return x


def _on_one(batch_fn: Callable[..., tf.Tensor], image: tf.Tensor,
            *args: Any) -> tf.Tensor:
  """Runs a ``_*_batch`` op on one image, as a batch of one."""
  out = batch_fn(image[None], *args)[0]
  out.set_shape(image.shape)
  return out


def _lut_index(images: tf.Tensor) -> tf.Tensor:
  """int32 [k, H * W * 3]: value + 256 * (3 * image + channel), into [k, 3, 256] LUTs."""
  shape = tf.shape(images)
  size = shape[1] * shape[2] * 3
  # One offset per element, built at [k, size] so that the add below is between equal
  # shapes: TF broadcasts a per-channel offset (inner dimension 3) several times slower.
  offsets = tf.broadcast_to(
      (tf.range(size) % 3) * 256 + 768 * tf.range(shape[0])[:, None], [shape[0], size])
  return tf.reshape(tf.cast(images, tf.int32), [shape[0], size]) + offsets


def _apply_luts(images: tf.Tensor, luts: tf.Tensor,
                index: tf.Tensor | None = None) -> tf.Tensor:
  """Maps channel c of image i through luts[i, c] (int32 [k, 3, 256]), like ``Image.point``.

  ``index`` is ``_lut_index(images)`` when the caller already has it.
  """
  if index is None:
    index = _lut_index(images)
  luts = tf.cast(tf.clip_by_value(luts, 0, 255), tf.uint8)
  # gather_nd with one index column is about twice as fast as gather here.
  out = tf.gather_nd(tf.reshape(luts, [-1]), index[..., None])
  out = tf.reshape(out, tf.shape(images))
  out.set_shape(images.shape)
  return out


# ---------------------------------------------------------------- pixel ops


def _auto_contrast_batch(images: tf.Tensor) -> tf.Tensor:
  shape = tf.shape(images)
  pixels = tf.reshape(images, [shape[0], shape[1] * shape[2], 3])
  lo = tf.cast(tf.reduce_min(pixels, axis=1), tf.float64)[..., None]
  hi = tf.cast(tf.reduce_max(pixels, axis=1), tf.float64)[..., None]
  # The guard only keeps the unused branch of the where below finite.
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  levels = tf.range(256, dtype=tf.float64)
  stretched = tf.clip_by_value(levels * scale + offset, 0.0, 255.0)
  luts = tf.where(hi > lo, stretched, levels)
  return _apply_luts(images, tf.cast(luts, tf.int32))


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
  return _on_one(_auto_contrast_batch, _check_image(image))


def _equalize_batch(images: tf.Tensor) -> tf.Tensor:
  k = tf.shape(images)[0]
  index = _lut_index(images)
  # The LUT index doubles as the histogram bin: one bincount for all images/channels.
  hist = tf.reshape(
      tf.math.bincount(tf.reshape(index, [-1]), minlength=768 * k, maxlength=768 * k,
                       dtype=tf.int32),
      [k, 3, 256])
  count = tf.reduce_sum(hist, axis=2)
  last_bin = 255 - tf.argmax(tf.reverse(hist, [2]) > 0, axis=2, output_type=tf.int32)
  last_count = tf.gather(hist, last_bin, batch_dims=2)
  step = (count - last_count) // 255
  safe_step = tf.maximum(step, 1)[..., None]
  cumulative = tf.cumsum(hist, axis=2, exclusive=True)
  equalized = tf.minimum((safe_step // 2 + cumulative) // safe_step, 255)
  identity = tf.broadcast_to(tf.range(256, dtype=tf.int32), tf.shape(hist))
  luts = tf.where(step[..., None] > 0, equalized, identity)
  return _apply_luts(images, luts, index)


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
  return _on_one(_equalize_batch, _check_image(image))


def _invert_batch(images: tf.Tensor) -> tf.Tensor:
  return tf.constant(255, tf.uint8) - images


def invert(image: Any) -> tf.Tensor:
  """255 - x, as ``PIL.ImageOps.invert``."""
  return _on_one(_invert_batch, _check_image(image))


def _posterize_batch(images: tf.Tensor, bits: Any) -> tf.Tensor:
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
  return tf.bitwise.bitwise_and(images, mask)


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
  return _on_one(_posterize_batch, _check_image(image), bits)


def _solarize_batch(images: tf.Tensor, threshold: Any) -> tf.Tensor:
  # int16 holds every value and the clipped threshold (256 and up: nothing inverted);
  # x ^ 0xFF is 255 - x, so XOR with a 0 / 0xFF mask selects without tf.where, which is
  # many times slower on uint8 images.
  threshold = tf.cast(tf.clip_by_value(tf.cast(threshold, tf.int32), 0, 256), tf.int16)
  flip = tf.cast(tf.cast(images, tf.int16) >= threshold, tf.uint8) * 255
  return tf.bitwise.bitwise_xor(images, flip)


def solarize(image: Any, threshold: Any) -> tf.Tensor:
  """Inverts values >= threshold, as ``PIL.ImageOps.solarize``.

  Args:
    image: uint8 [H, W, 3].
    threshold: int or int scalar tensor; 256 or more leaves the image unchanged.

  Returns:
    uint8 [H, W, 3].
  """
  return _on_one(_solarize_batch, _check_image(image), threshold)


def _solarize_add_batch(images: tf.Tensor, addition: Any, threshold: Any) -> tf.Tensor:
  # Clipping the addition to +-255 and the threshold to [0, 256] changes no result
  # (values are 0..255) and keeps the int16 arithmetic below from overflowing.
  addition = tf.cast(tf.clip_by_value(tf.cast(addition, tf.int32), -255, 255), tf.int16)
  threshold = tf.cast(tf.clip_by_value(tf.cast(threshold, tf.int32), 0, 256), tf.int16)
  values = tf.cast(images, tf.int16)
  below = tf.cast(values < threshold, tf.int16)
  added = tf.clip_by_value(values + addition, 0, 255)
  # values + below * (added - values) selects without tf.where (slow on images).
  return tf.cast(values + below * (added - values), tf.uint8)


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
  return _on_one(_solarize_add_batch, _check_image(image), addition, threshold)


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


def _grayscale(images: tf.Tensor) -> tf.Tensor:
  """Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point), int32."""
  rgb = tf.cast(images, tf.int32)
  luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  return tf.bitwise.right_shift(luma, 16)


def _color_batch(images: tf.Tensor, factor: Any) -> tf.Tensor:
  return _blend(_grayscale(images)[..., None], images, factor)


def color(image: Any, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Color(image).enhance(factor)``: blend with the greyscale image.

  Args:
    image: uint8 [H, W, 3].
    factor: float or float scalar tensor; 0 gives greyscale, 1 the image unchanged.

  Returns:
    uint8 [H, W, 3].
  """
  return _on_one(_color_batch, _check_image(image), factor)


def _contrast_batch(images: tf.Tensor, factor: Any) -> tf.Tensor:
  total = tf.reduce_sum(tf.cast(_grayscale(images), tf.int64), axis=[1, 2])
  shape = tf.shape(images, out_type=tf.int64)
  count = shape[1] * shape[2]
  mean = (2 * total + count) // tf.maximum(2 * count, 1)
  return _blend(mean[:, None, None, None], images, factor)


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
  return _on_one(_contrast_batch, _check_image(image), factor)


def _brightness_batch(images: tf.Tensor, factor: Any) -> tf.Tensor:
  return _blend(tf.zeros([], tf.uint8), images, factor)


def brightness(image: Any, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Brightness(image).enhance(factor)``: blend with black.

  Args:
    image: uint8 [H, W, 3].
    factor: float or float scalar tensor; 0 gives black, 1 the image unchanged.

  Returns:
    uint8 [H, W, 3].
  """
  return _on_one(_brightness_batch, _check_image(image), factor)


def _sharpness_batch(images: tf.Tensor, factor: Any) -> tf.Tensor:
  x = tf.cast(images, tf.float32)
  # Separable 3x3 box sum over the interior, plus 4x the centre for the kernel's 5.
  # Python-style slices give empty (not negative-sized) results for tiny images.
  rows = x[:, :-2] + x[:, 1:-1] + x[:, 2:]
  centre = x[:, 1:-1, 1:-1]
  sums = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * centre
  # Integer sums up to 13 * 255 are exact in float32, and sums / 13 is never within
  # 1/26 of a .5 tie, so this rounding is exact (and half-to-even cannot matter).
  smoothed = tf.round(sums / 13)
  interior = _blend(smoothed, images[:, 1:-1, 1:-1], factor)
  # The border blends with itself, i.e. stays as it is: paste the interior back.
  height, width = tf.shape(images)[1], tf.shape(images)[2]
  middle = images[:, 1:-1]
  middle = tf.concat(
      [middle[:, :, :1], interior, middle[:, :, tf.maximum(width - 1, 1):]], axis=2)
  out = tf.concat([images[:, :1], middle, images[:, tf.maximum(height - 1, 1):]], axis=1)
  out.set_shape(images.shape)
  return out


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
  return _on_one(_sharpness_batch, _check_image(image), factor)


# ---------------------------------------------------------------- geometric ops


def _projective_transform(matrix: tuple[Any, ...]) -> tf.Tensor:
  """The ImageProjectiveTransform row (float32 [8]) for a Pillow AFFINE ``matrix``.

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
  return tf.cast(transform, tf.float32)


def _geometric_transform(name: str, value: Any, height: Any, width: Any) -> tf.Tensor:
  """The transform row (float32 [8]) of geometric op ``name`` with signed argument."""
  if name == 'Rotate':
    # The matrix is built in float64 (as Pillow does) and only the result is rounded.
    theta = tf.cast(value, tf.float64) * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx, cy = tf.cast(width, tf.float64) / 2, tf.cast(height, tf.float64) / 2
    # Output point p samples R(theta) (p - centre) + centre, in Pillow's edge
    # coordinates.
    matrix = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
  elif name == 'ShearX':
    matrix = (1.0, value, 0.0, 0.0, 1.0, 0.0)
  elif name == 'ShearY':
    matrix = (1.0, 0.0, 0.0, value, 1.0, 0.0)
  elif name == 'TranslateX':
    matrix = (1.0, 0.0, value, 0.0, 1.0, 0.0)
  elif name == 'TranslateY':
    matrix = (1.0, 0.0, 0.0, 0.0, 1.0, value)
  else:
    raise ValueError(f'{name} is not a geometric op; those are {_GEOMETRIC_OPS}.')
  return _projective_transform(matrix)


def _pixel_maps(transforms: tf.Tensor, height: Any, width: Any) -> tf.Tensor:
  """Which input pixel each output pixel takes under each transform (float32 [T, 8]).

  Returns int32 [T, H * W]: the flat input pixel index, or H * W where the output is
  fill. ``Image.transform(..., NEAREST)`` = ``ImageProjectiveTransformV3`` with NEAREST
  interpolation, which picks a source pixel from coordinates alone, the same for every
  dtype and channel; running it on an image of pixel indices records that choice, so
  remapping through these maps gives exactly the kernel's output, at a fraction of the
  cost when the maps are reused across images.
  """
  count = height * width
  indices = tf.reshape(tf.range(count, dtype=tf.int32), [1, height, width, 1])
  maps = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.tile(indices, [tf.shape(transforms)[0], 1, 1, 1]),
      transforms=transforms, output_shape=tf.stack([height, width]),
      fill_value=tf.constant(-1.0, tf.float32), interpolation='NEAREST',
      fill_mode='CONSTANT')
  maps = tf.reshape(maps, [tf.shape(transforms)[0], count])
  return tf.where(maps < 0, count, maps)


def _remap_batch(images: tf.Tensor, maps: tf.Tensor) -> tf.Tensor:
  """images[i] remapped through maps[i] (int32 [k, H * W], from ``_pixel_maps``)."""
  shape = tf.shape(images)
  fill = tf.fill([shape[0], 1, 3], tf.constant(FILL_VALUE, tf.uint8))
  # Index H * W is the fill pixel appended to each image.
  pixels = tf.concat([tf.reshape(images, [shape[0], shape[1] * shape[2], 3]), fill], 1)
  out = tf.reshape(tf.gather(pixels, maps, axis=1, batch_dims=1), shape)
  out.set_shape(images.shape)
  return out


def _affine(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
  """``Image.transform(size, AFFINE, ..., NEAREST, fillcolor=128)`` on one image."""
  shape = tf.shape(image)
  return _on_one(_remap_batch, image, _pixel_maps(transform[None], shape[0], shape[1]))


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
  shape = tf.shape(image)
  return _affine(image, _geometric_transform('Rotate', degrees, shape[0], shape[1]))


def shear_x(image: Any, level: Any) -> tf.Tensor:
  """Output (x, y) samples input (x + level * y, y): Pillow AFFINE (1, level, 0, 0, 1, 0).

  Args:
    image: uint8 [H, W, 3].
    level: float or float scalar tensor.

  Returns:
    uint8 [H, W, 3], grey 128 where the source is outside the image.
  """
  image = _check_image(image)
  return _affine(image, _geometric_transform('ShearX', level, None, None))


def shear_y(image: Any, level: Any) -> tf.Tensor:
  """Output (x, y) samples input (x, y + level * x): Pillow AFFINE (1, 0, 0, level, 1, 0).

  Args:
    image: uint8 [H, W, 3].
    level: float or float scalar tensor.

  Returns:
    uint8 [H, W, 3], grey 128 where the source is outside the image.
  """
  image = _check_image(image)
  return _affine(image, _geometric_transform('ShearY', level, None, None))


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
  return _affine(image, _geometric_transform('TranslateX', pixels, None, None))


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
  return _affine(image, _geometric_transform('TranslateY', pixels, None, None))


def _cutout_batch(images: tf.Tensor, pad_size: Any, centres: tf.Tensor) -> tf.Tensor:
  """Cutout of images[i] around centres[i] (int32 [k, 2]: row, column)."""
  shape = tf.shape(images)
  pad_size = tf.cast(pad_size, tf.int32)
  cy, cx = centres[:, :1], centres[:, 1:]
  rows, cols = tf.range(shape[1])[None, :], tf.range(shape[2])[None, :]
  in_rows = (rows >= cy - pad_size) & (rows < cy + pad_size)
  in_cols = (cols >= cx - pad_size) & (cols < cx + pad_size)
  # 0xFF inside the box and 0 outside, as a [k, H, 1] and a [k, 1, W * 3] byte mask:
  # broadcasting along whole rows is fast, unlike along the inner channel dimension.
  row_mask = tf.cast(in_rows, tf.uint8)[:, :, None] * 255
  col_mask = tf.repeat(tf.cast(in_cols, tf.uint8) * 255, 3, axis=1)[:, None, :]
  flat = tf.reshape(images, [shape[0], shape[1], shape[2] * 3])
  # x ^ ((x ^ 128) & mask) is 128 where the mask is 0xFF and x where it is 0: a select
  # without tf.where, which is many times slower on uint8 images.
  box = tf.bitwise.bitwise_and(
      tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(flat, FILL_VALUE), col_mask),
      row_mask)
  out = tf.reshape(tf.bitwise.bitwise_xor(flat, box), shape)
  out.set_shape(images.shape)
  return out


def _cutout_centre(seed: tf.Tensor, height: Any, width: Any) -> tf.Tensor:
  """The Cutout centre (int32 [2]: row, column) drawn from ``seed``."""
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return tf.stack([tf.random.stateless_uniform([], seed_y, 0, height, tf.int32),
                   tf.random.stateless_uniform([], seed_x, 0, width, tf.int32)])


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
  centre = _cutout_centre(seed, shape[0], shape[1])
  return _on_one(_cutout_batch, image, pad_size, centre[None])


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


# The random draws, shared by randaugment (one image) and randaugment_batch (a
# map_fn over the seeds), so that both make the same choices from the same seed:
#   seed -> one seed per layer -> (op choice seed, op seed);
#   op seed -> (sign seed, Cutout seed); Cutout seed -> (row seed, column seed).


def _layer_choices(seed: tf.Tensor,
                   num_layers: int) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
  """Per layer, the op index (int32 scalar) and the op's seed (the sign, Cutout)."""
  op_indices, op_seeds = [], []
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    choice_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 2))
    op_indices.append(tf.random.stateless_uniform([], choice_seed, 0, NUM_OPS, tf.int32))
    op_seeds.append(op_seed)
  return op_indices, op_seeds


def _op_seeds(op_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(sign seed, Cutout seed) of one op application."""
  sign_seed, cutout_seed = tf.unstack(tf.random.experimental.stateless_split(op_seed, 2))
  return sign_seed, cutout_seed


def _is_negative(sign_seed: tf.Tensor) -> tf.Tensor:
  """Whether a signed op takes its negative argument (bool scalar)."""
  return tf.random.stateless_uniform([], sign_seed) < 0.5


def _image_draws(seed: tf.Tensor, num_layers: int, height: Any, width: Any) -> tf.Tensor:
  """All random choices for one image: int32 [num_layers, 4].

  Row l is (op index, 1 if a signed op is negated else 0, Cutout centre row, column)
  of layer l, exactly as ``randaugment`` / ``apply_op`` draw them from ``seed``.
  """
  rows = []
  for op_index, op_seed in zip(*_layer_choices(seed, num_layers)):
    sign_seed, cutout_seed = _op_seeds(op_seed)
    negative = tf.cast(_is_negative(sign_seed), tf.int32)
    rows.append(tf.concat(
        [tf.stack([op_index, negative]), _cutout_centre(cutout_seed, height, width)], 0))
  return tf.stack(rows)


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
  sign_seed, cutout_seed = _op_seeds(seed)
  sign = tf.where(_is_negative(sign_seed), tf.constant(-1.0, tf.float64),
                  tf.constant(1.0, tf.float64))

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
  deterministic function of (image, seed). For batches, ``randaugment_batch`` gives the
  same results faster.

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
  _check_num_layers(num_layers)
  _check_magnitude(magnitude)
  if num_layers == 0:
    return image
  seed = _check_seed(seed)
  for op_index, op_seed in zip(*_layer_choices(seed, num_layers)):
    image = apply_op(image, op_index, magnitude, op_seed)
  return image


# ---------------------------------------------------------------- batched RandAugment


def _geometric_maps(magnitude: float, height: Any, width: Any) -> tf.Tensor:
  """Pixel maps (int32 [10, H * W], see ``_pixel_maps``) of the geometric ops at m.

  Map 2 * i + s is op ``_GEOMETRIC_OPS[i]`` with sign -1 if s else +1. With static
  H and W the maps are computed once, eagerly, and embedded as a constant.
  """
  array = None
  if isinstance(height, int) and isinstance(width, int):
    with tf.init_scope():
      if tf.executing_eagerly():
        array = _static_geometric_maps(float(magnitude), height, width)
  if array is not None:
    return tf.constant(array)
  return _compute_geometric_maps(magnitude, height, width)


@functools.lru_cache(maxsize=16)
def _static_geometric_maps(magnitude: float, height: int, width: int) -> np.ndarray:
  return _compute_geometric_maps(magnitude, height, width).numpy()


def _compute_geometric_maps(magnitude: float, height: Any, width: Any) -> tf.Tensor:
  args = op_arguments(magnitude)
  transforms = []
  for name in _GEOMETRIC_OPS:
    for sign in (1.0, -1.0):
      # The same float64 product apply_op forms, so the transforms agree bit for bit.
      value = tf.constant(sign, tf.float64) * args[name]
      transforms.append(_geometric_transform(name, value, height, width))
  return _pixel_maps(tf.stack(transforms), height, width)


def _layer_kernels(magnitude: float) -> dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
                                             | None]:
  """Per op, fn(sub-batch, its draws [k, 4]) applying it at m; None where it is the
  identity at m (then its images are passed through untouched).

  The draws columns are (negative, Cutout row, Cutout column, geometric map index).
  """
  args = op_arguments(magnitude)

  def enhance(fn: Callable[..., tf.Tensor], factor: float):
    # The float32 blend with factor 1 returns the image exactly (small integers).
    if np.float32(factor) == 1.0:
      return None
    return lambda images, draws: fn(images, factor)

  return {
      'AutoContrast': lambda images, draws: _auto_contrast_batch(images),
      'Equalize': lambda images, draws: _equalize_batch(images),
      'Invert': lambda images, draws: _invert_batch(images),
      'Posterize': (None if args['Posterize'] >= 8 else
                    lambda images, draws: _posterize_batch(images, args['Posterize'])),
      'Solarize': (None if args['Solarize'] >= 256 else
                   lambda images, draws: _solarize_batch(images, args['Solarize'])),
      'Color': enhance(_color_batch, args['Color']),
      'Contrast': enhance(_contrast_batch, args['Contrast']),
      'Brightness': enhance(_brightness_batch, args['Brightness']),
      'Sharpness': enhance(_sharpness_batch, args['Sharpness']),
      'Cutout': (None if args['Cutout'] <= 0 else
                 lambda images, draws: _cutout_batch(images, args['Cutout'], draws[:, 1:3])),
      'SolarizeAdd': (
          None if args['SolarizeAdd'] == 0 else
          lambda images, draws: _solarize_add_batch(images, args['SolarizeAdd'], 128)),
  }


def _apply_layer_batch(images: tf.Tensor, op_indices: tf.Tensor, draws: tf.Tensor,
                       magnitude: float, maps: tf.Tensor | None = None) -> tf.Tensor:
  """One RandAugment layer on a batch: image i gets op ``OP_NAMES[op_indices[i]]``.

  Equal to ``apply_op(images[i], op_indices[i], magnitude, op_seed)`` for every i
  when ``draws[i]`` is what ``op_seed`` draws (see ``_image_draws``).

  Args:
    images: uint8 [B, H, W, 3].
    op_indices: int32 [B], values in [0, NUM_OPS).
    draws: int32 [B, 3]: per image 1 if a signed op takes its negative argument else
      0, and the Cutout centre row and column.
    magnitude: m >= 0, a Python number.
    maps: ``_geometric_maps(magnitude, H, W)``, or None to compute them here.

  Returns:
    uint8 [B, H, W, 3].
  """
  shape = tf.shape(images)
  if maps is None:
    maps = _geometric_maps(magnitude, images.shape[1] or shape[1],
                           images.shape[2] or shape[2])
  kernels = _layer_kernels(magnitude)
  # Groups of images that get the same treatment: 0 passes images through (ops that
  # are the identity at this magnitude), one group per other non-geometric op, and one
  # for all geometric ops, which differ only in their pixel map.
  group_fns: list[Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None] = [None]
  group_of_op, map_slot_of_op = [], []
  geometric_group = None
  for name in OP_NAMES:
    if name in SIGNED_OPS:
      if geometric_group is None:
        geometric_group = len(group_fns)
        group_fns.append(lambda part, part_draws: _remap_batch(
            part, tf.gather(maps, part_draws[:, 3])))
      group_of_op.append(geometric_group)
      map_slot_of_op.append(2 * _GEOMETRIC_OPS.index(name))
    elif kernels[name] is None:
      group_of_op.append(0)
      map_slot_of_op.append(0)
    else:
      group_of_op.append(len(group_fns))
      group_fns.append(kernels[name])
      map_slot_of_op.append(0)
  op_indices = tf.cast(op_indices, tf.int32)
  draws = tf.cast(draws, tf.int32)
  map_index = tf.gather(tf.constant(map_slot_of_op, tf.int32), op_indices) + draws[:, 0]
  draws = tf.concat([draws, map_index[:, None]], axis=1)
  groups = tf.gather(tf.constant(group_of_op, tf.int32), op_indices)
  num_groups = len(group_fns)
  image_parts = tf.dynamic_partition(images, groups, num_groups)
  draw_parts = tf.dynamic_partition(draws, groups, num_groups)
  positions = tf.dynamic_partition(tf.range(shape[0]), groups, num_groups)
  outputs = [part if fn is None else fn(part, part_draws)
             for fn, part, part_draws in zip(group_fns, image_parts, draw_parts)]
  out = tf.dynamic_stitch(positions, outputs)
  out.set_shape(images.shape)
  return out


def randaugment_batch(images: Any, seeds: Any, *, num_layers: int,
                      magnitude: float) -> tf.Tensor:
  """RandAugment on a batch, one seed per image: exactly ``randaugment`` per image.

  ``randaugment_batch(images, seeds, ...)[i] == randaugment(images[i], seeds[i], ...)``
  bit for bit: the random choices are drawn from each seed by the same code, and each
  op runs once per layer on the sub-batch of images that drew it. Works eagerly and
  inside ``tf.data.Dataset.map`` / ``tf.function``, with a static or dynamic batch size.

  Args:
    images: uint8 [B, H, W, 3]. H and W should be static (e.g. batches with
      ``drop_remainder=True`` of fixed-size crops): the geometric ops' pixel maps are
      then computed once at trace time instead of in every call.
    seeds: int32/int64 [B, 2], one stateless seed per image.
    num_layers: N >= 0 (4 in the NFNet recipe); 0 returns the images unchanged.
    magnitude: m >= 0, a Python number (see the module docstring).

  Returns:
    uint8 [B, H, W, 3].

  Raises:
    ValueError: on bad images, seeds, num_layers or magnitude.
  """
  images = _check_images(images)
  seeds = _check_seeds(seeds, images)
  _check_num_layers(num_layers)
  _check_magnitude(magnitude)
  if num_layers == 0:
    return images
  shape = tf.shape(images)
  if images.shape[0] is None or seeds.shape[0] is None:
    with tf.control_dependencies([tf.debugging.assert_equal(
        tf.shape(seeds)[0], shape[0],
        message='randaugment_batch: seeds must have one row per image')]):
      seeds = tf.identity(seeds)
  height = images.shape[1] if images.shape[1] is not None else shape[1]
  width = images.shape[2] if images.shape[2] is not None else shape[2]
  draws = tf.map_fn(
      lambda seed: _image_draws(seed, num_layers, height, width), seeds,
      fn_output_signature=tf.TensorSpec([num_layers, 4], tf.int32))
  maps = _geometric_maps(magnitude, height, width)
  for layer in range(num_layers):
    images = _apply_layer_batch(images, draws[:, layer, 0], draws[:, layer, 1:],
                                magnitude, maps)
  return images
