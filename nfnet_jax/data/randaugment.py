"""RandAugment (Cubuk et al., 2020) as the NFNet training recipe uses it, in core TensorFlow.

In the NFNet recipe RandAugment runs *after* MixUp/CutMix (nfnet-spec section 3): the
pipeline mixes each per-device batch, rounds the mixed images to uint8 and augments
every image with its own seed. ``randaugment(image, seed, num_layers=N, magnitude=m)``
augments one [H, W, 3] image; ``randaugment_batch(images, seeds, ...)`` augments a
[B, H, W, 3] batch with one seed per image and returns exactly what ``randaugment``
returns for each (image, seed), 2-3x faster per image. Each of the N layers
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

# Everything here branches on Python values only; converting it with AutoGraph (which
# tf.data.Dataset.map and tf.function apply to the code they call) only costs seconds
# of tracing.
_no_autograph = tf.autograph.experimental.do_not_convert

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
  """Clips float32 to 0..255 and truncates to uint8, like Pillow's float -> UINT8 stores."""
  # The fused kernel makes one pass over the image; tf.clip_by_value makes two.
  x = tf.raw_ops.ClipByValue(t=x, clip_value_min=tf.constant(0.0),
                             clip_value_max=tf.constant(255.0))
  x = tf.cast(x, tf.uint8)
  x.set_shape(like.shape)
  return x


def _on_one(batch_fn: Callable[..., tf.Tensor], image: tf.Tensor,
            *args: Any) -> tf.Tensor:
  """Runs a ``_*_batch`` op on one image, as a batch of one."""
  # expand_dims / squeeze rather than [None] / [0]: fewer graph nodes, which matters
  # for the per-image graph (16 ops per layer, each a switch_case branch).
  out = tf.squeeze(batch_fn(tf.expand_dims(image, 0), *args), [0])
  out.set_shape(image.shape)
  return out


def _lut_channels(images: tf.Tensor) -> tf.Tensor:
  """int32 [H * W * 3]: 256 * channel of each value of an image, flattened.

  A constant for static shapes: computing it costs as much as the rest of
  ``_lut_index``, and the batched path would pay that in every layer even for empty
  sub-batches.
  """
  if images.shape[-3] is not None and images.shape[-2] is not None:
    return tf.constant(
        np.tile(np.array([0, 256, 512], np.int32), images.shape[-3] * images.shape[-2]))
  shape = tf.shape(images)
  return (tf.range(shape[-3] * shape[-2] * 3) % 3) * 256


def _lut_index(images: tf.Tensor, channels: tf.Tensor | None = None) -> tf.Tensor:
  """int32 [k, H * W * 3]: value + 256 * (3 * image + channel), into [k, 3, 256] LUTs.

  ``channels`` is ``_lut_channels(images)`` when the caller already has it.
  """
  if channels is None:
    channels = _lut_channels(images)
  shape = tf.shape(images)
  # The offsets are added as one [k, H * W * 3] tensor: broadcasting a [3] per-channel
  # offset along the inner dimension is several times slower in TF.
  offsets = channels + 768 * tf.range(shape[0])[:, None]
  return tf.reshape(tf.cast(images, tf.int32), tf.shape(offsets)) + offsets


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


def _auto_contrast_batch(images: tf.Tensor, channels: tf.Tensor | None = None) -> tf.Tensor:
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
  return _apply_luts(images, tf.cast(luts, tf.int32), _lut_index(images, channels))


@_no_autograph
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


def _equalize_batch(images: tf.Tensor, channels: tf.Tensor | None = None) -> tf.Tensor:
  k = tf.shape(images)[0]
  index = _lut_index(images, channels)
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


@_no_autograph
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


@_no_autograph
def invert(image: Any) -> tf.Tensor:
  """255 - x, as ``PIL.ImageOps.invert``."""
  return _on_one(_invert_batch, _check_image(image))


def _posterize_batch(images: tf.Tensor, bits: Any) -> tf.Tensor:
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
  return tf.bitwise.bitwise_and(images, mask)


@_no_autograph
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


def _threshold_mask(images: tf.Tensor, threshold: Any, *, below: bool = False) -> tf.Tensor:
  """uint8, 0xFF where images >= threshold (any int) and 0 elsewhere; or < if below.

  Masks combined with bitwise ops replace tf.where, which is many times slower on
  uint8 images; everything stays in uint8.
  """
  threshold = tf.convert_to_tensor(threshold)
  known = tf.get_static_value(threshold)
  if known is not None and not 0 < known < 256:
    return tf.fill(tf.shape(images), tf.constant(255 if (known <= 0) != below else 0,
                                                 tf.uint8))
  clipped = tf.clip_by_value(tf.cast(threshold, tf.int32), 0, 256)
  at_or_above = tf.cast(images >= tf.cast(tf.minimum(clipped, 255), tf.uint8), tf.uint8)
  if known is None:
    # A threshold of 256 (or more) is above every value, but was compared as 255.
    at_or_above *= tf.cast(clipped <= 255, tf.uint8)
  # 1 - 1 = 0 and 0 - 1 = 0xFF in uint8. (Not 0 - x for the other mask: graph
  # optimisation turns that into Neg, which has no uint8 kernel.)
  return at_or_above - 1 if below else at_or_above * 255


def _solarize_batch(images: tf.Tensor, threshold: Any) -> tf.Tensor:
  # x ^ 0xFF is 255 - x.
  return tf.bitwise.bitwise_xor(images, _threshold_mask(images, threshold))


@_no_autograph
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
  addition = tf.convert_to_tensor(addition)
  # Saturating uint8 arithmetic: with p = max(a, 0) and n = max(-a, 0) (|a| clipped to
  # 255, which changes no result), min(max(x, n) - n, 255 - p) + p = clip(x + a, 0, 255).
  known = tf.get_static_value(addition)
  addition = tf.clip_by_value(tf.cast(addition, tf.int32), -255, 255)
  if known is not None and known >= 0:
    # RandAugment's case. The sum is >= x, so max(x, sum & mask) selects it where the
    # mask is 0xFF (values below the threshold) and x elsewhere.
    add = tf.cast(addition, tf.uint8)
    added = tf.minimum(images, tf.constant(255, tf.uint8) - add) + add
    return tf.maximum(images, tf.bitwise.bitwise_and(
        added, _threshold_mask(images, threshold, below=True)))
  subtract = tf.cast(tf.maximum(-addition, 0), tf.uint8)
  add = tf.cast(tf.maximum(addition, 0), tf.uint8)
  added = tf.minimum(tf.maximum(images, subtract) - subtract,
                     tf.constant(255, tf.uint8) - add) + add
  # x ^ ((x ^ y) & mask) is y where the mask is 0xFF and x where it is 0.
  below = _threshold_mask(images, threshold, below=True)
  return tf.bitwise.bitwise_xor(
      images, tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(images, added), below))


@_no_autograph
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


def _grayscale(channels: list[tf.Tensor]) -> tf.Tensor:
  """Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point), as float32.

  Args:
    channels: the red, green and blue planes, float32 [...] each (as unstacked by
      ``_planes``, which is much faster than slicing them).

  Returns:
    (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16, float32 [...], computed in float32:
    every term and sum is an integer below 255 * 65536 + 0x8000 < 2**24, so exact, and
    so are the scaling by 2**-16 and the floor.
  """
  red, green, blue = channels
  luma = red * 19595.0 + green * 38470.0 + blue * 7471.0 + 32768.0
  return tf.floor(luma * (1.0 / 65536))


def _planes(images: tf.Tensor) -> list[tf.Tensor]:
  """The three channels of uint8 [..., 3] images as float32 [...] planes."""
  return [tf.cast(plane, tf.float32) for plane in tf.unstack(images, axis=-1)]


def _color_batch(images: tf.Tensor, factor: Any) -> tf.Tensor:
  # Broadcasting the grey plane along the inner channel dimension is slow in TF; doing
  # it once, up front, beats letting both the subtraction and the addition do it.
  grey = tf.broadcast_to(_grayscale(_planes(images))[..., None], tf.shape(images))
  return _blend(grey, images, factor)


@_no_autograph
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
  total = tf.reduce_sum(tf.cast(_grayscale(_planes(images)), tf.int64), axis=[1, 2])
  shape = tf.shape(images, out_type=tf.int64)
  count = shape[1] * shape[2]
  mean = (2 * total + count) // tf.maximum(2 * count, 1)
  return _blend(mean[:, None, None, None], images, factor)


@_no_autograph
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
  # _blend with black: 0 + f * (x - 0) is exactly f * x in float32, in one multiply.
  return _to_uint8(tf.cast(factor, tf.float32) * tf.cast(images, tf.float32), images)


@_no_autograph
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
  shape = tf.shape(images)
  height, width = shape[1], shape[2]
  # Rows of W * 3 values: a pixel's horizontal neighbours are 3 values away. The row
  # slices are taken in uint8 and cast after: TF copies such slices of float32 tensors
  # several times slower.
  flat = tf.reshape(images, [shape[0], height, width * 3])
  above, middle, below = (tf.cast(flat[:, :-2], tf.float32),
                          tf.cast(flat[:, 1:-1], tf.float32),
                          tf.cast(flat[:, 2:], tf.float32))
  # Separable 3x3 box sum over the interior, plus 4x the centre for the kernel's 5.
  # Python-style slices give empty (not negative-sized) results for tiny images.
  rows = above + middle + below
  centre = middle[:, :, 3:-3]
  sums = rows[:, :, :-6] + rows[:, :, 3:-3] + rows[:, :, 6:] + 4 * centre
  # Integer sums up to 13 * 255 are exact in float32, and sums / 13 is never within
  # 1/26 of a .5 tie, so rounding it is exact even with the multiplication's relative
  # error of 2**-24 (and half-to-even cannot matter).
  smoothed = tf.round(sums * (1.0 / 13))
  interior = _blend(smoothed, centre, factor)
  # The border blends with itself, i.e. stays as it is: paste the interior back.
  middle = flat[:, 1:-1]
  middle = tf.concat(
      [middle[:, :, :3], interior, middle[:, :, tf.maximum(width - 1, 1) * 3:]], axis=2)
  out = tf.concat([flat[:, :1], middle, flat[:, tf.maximum(height - 1, 1):]], axis=1)
  out = tf.reshape(out, shape)
  out.set_shape(images.shape)
  return out


@_no_autograph
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
  count = shape[1] * shape[2]
  # Pixel H * W of each image is an appended fill pixel; the maps index a flat list of
  # all k * (H * W + 1) pixels, for one gather_nd (about twice as fast as a gather
  # with batch_dims).
  fill = tf.fill([shape[0], 1, 3], tf.constant(FILL_VALUE, tf.uint8))
  pixels = tf.concat([tf.reshape(images, [shape[0], count, 3]), fill], 1)
  pixels = tf.reshape(pixels, [shape[0] * (count + 1), 3])
  index = maps + (count + 1) * tf.range(shape[0])[:, None]
  out = tf.reshape(tf.gather_nd(pixels, index[..., None]), shape)
  out.set_shape(images.shape)
  return out


def _shift_batch(images: tf.Tensor, dy: int, dx: int) -> tf.Tensor:
  """out[:, y, x] = images[:, y + dy, x + dx], fill where that is outside (static H, W).

  The pixel map of a whole-pixel translation, done by slicing and concatenating, which
  costs a fraction of a gather.
  """
  height, width = images.shape[1], images.shape[2]
  k = tf.shape(images)[0]
  top, bottom = min(max(-dy, 0), height), max(min(height - dy, height), 0)
  left, right = min(max(-dx, 0), width), max(min(width - dx, width), 0)
  if bottom <= top or right <= left:
    return tf.fill(tf.shape(images), tf.constant(FILL_VALUE, tf.uint8))

  def fill(rows: int, cols: int) -> tf.Tensor:
    return tf.fill([k, rows, cols, 3], tf.constant(FILL_VALUE, tf.uint8))

  out = images[:, top + dy:bottom + dy, left + dx:right + dx]
  if left > 0 or right < width:
    out = tf.concat([fill(bottom - top, left), out, fill(bottom - top, width - right)], 2)
  if top > 0 or bottom < height:
    out = tf.concat([fill(top, width), out, fill(height - bottom, width)], 1)
  out.set_shape(images.shape)
  return out


def _affine(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
  """``Image.transform(size, AFFINE, ..., NEAREST, fillcolor=128)`` on one image.

  Applies the kernel directly: for one image and one transform that is as fast as
  computing its pixel map, and keeps the per-image graph small. The batched path
  remaps through maps computed by this same kernel, so the two agree exactly (the
  tests check it).
  """
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(FILL_VALUE, tf.float32), interpolation='NEAREST',
      fill_mode='CONSTANT')[0]
  out.set_shape(image.shape)
  return out


@_no_autograph
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


@_no_autograph
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


@_no_autograph
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


@_no_autograph
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


@_no_autograph
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
  col_mask = tf.reshape(tf.broadcast_to(tf.cast(in_cols, tf.uint8)[:, None, :, None] * 255,
                                        [shape[0], 1, shape[2], 3]),
                        [shape[0], 1, shape[2] * 3])
  flat = tf.reshape(images, [shape[0], shape[1], shape[2] * 3])
  # x ^ ((x ^ 128) & mask) is 128 where the mask is 0xFF and x where it is 0: a select
  # without tf.where, which is many times slower on uint8 images.
  box = tf.bitwise.bitwise_and(
      tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(flat, FILL_VALUE), col_mask),
      row_mask)
  out = tf.reshape(tf.bitwise.bitwise_xor(flat, box), shape)
  out.set_shape(images.shape)
  return out


@_no_autograph
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
  _, row, column = _op_draws(seed, shape[0], shape[1])
  return _on_one(_cutout_batch, image, pad_size, tf.stack([row, column])[None])


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


# The random draws, shared by randaugment (one image) and randaugment_batch (per seed,
# unrolled or in a map_fn), so that both make the same choices from the same seed.
# They take 1 + num_layers stateless draws per image: batched, these per-seed draws
# run one after another, so their number matters.


def _layer_choices(seed: tf.Tensor, num_layers: int) -> tuple[tf.Tensor, tf.Tensor]:
  """The op index of each layer (int32 [L]) and each op's own seed ([L, 2], seed's dtype).

  One draw of [num_layers, 3] full-range integers: row l's first two columns are
  layer l's op seed (as ``stateless_split`` would make it) and the third picks its op;
  the residue mod 16 of a full-range integer is exactly uniform.
  """
  bits = tf.random.stateless_uniform(
      [num_layers, 3], seed, minval=None, maxval=None, dtype=seed.dtype)
  return tf.cast(tf.math.floormod(bits[:, 2], NUM_OPS), tf.int32), bits[:, :2]


def _op_draws(op_seed: tf.Tensor, height: Any,
              width: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(negative, row, column) drawn from one op's seed.

  ``negative`` (bool scalar, probability 1/2) negates a signed op's argument; (row,
  column) (int32 scalars) is the Cutout centre, uniform over the pixels up to a bias
  of H / 2**32.
  """
  bits = tf.random.stateless_uniform([3], op_seed, minval=None, maxval=None,
                                     dtype=tf.int32)
  return (bits[0] < 0, tf.math.floormod(bits[1], height),
          tf.math.floormod(bits[2], width))


def _image_draws(seed: tf.Tensor, num_layers: int, height: Any, width: Any) -> tf.Tensor:
  """All random choices for one image: int32 [num_layers, 4].

  Row l is (op index, 1 if a signed op is negated else 0, Cutout centre row, column)
  of layer l, exactly as ``randaugment`` / ``apply_op`` draw them from ``seed``.
  """
  rows = []
  op_indices, op_seeds = _layer_choices(seed, num_layers)
  for op_index, op_seed in zip(tf.unstack(op_indices), tf.unstack(op_seeds)):
    negative, row, column = _op_draws(op_seed, height, width)
    rows.append(tf.stack([op_index, tf.cast(negative, tf.int32), row, column]))
  return tf.stack(rows)


@_no_autograph
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
  shape = tf.shape(image)
  negative, row, column = _op_draws(seed, shape[0], shape[1])
  sign = tf.where(negative, tf.constant(-1.0, tf.float64), tf.constant(1.0, tf.float64))

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
      # What cutout(image, args['Cutout'], seed) draws, without drawing it again.
      'Cutout': lambda: _on_one(_cutout_batch, image, args['Cutout'],
                                tf.stack([row, column])[None]),
      'SolarizeAdd': lambda: solarize_add(image, args['SolarizeAdd']),
  }
  out = tf.switch_case(
      tf.cast(op_index, tf.int32), [branches[name] for name in OP_NAMES])
  out.set_shape(image.shape)
  return out


@_no_autograph
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
  op_indices, op_seeds = _layer_choices(seed, num_layers)

  def layer(index: tf.Tensor, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return index + 1, apply_op(image, op_indices[index], magnitude, op_seeds[index])

  # A loop rather than num_layers copies of apply_op's 16-branch switch keeps the
  # graph small, which makes tf.data iterators start several times faster. (Eagerly,
  # tf.while_loop is a plain Python loop.)
  _, image = tf.while_loop(lambda index, _: index < num_layers, layer,
                           (tf.constant(0), image), maximum_iterations=num_layers)
  return image


# ---------------------------------------------------------------- batched RandAugment


def _geometric_plan(magnitude: float, height: Any,
                    width: Any) -> tuple[tf.Tensor, tuple[tuple[int, int] | None, ...]]:
  """The geometric ops' pixel maps at m, and which of them are plain shifts.

  Returns (maps, shifts): maps is int32 [10, H * W] (see ``_pixel_maps``), map 2 * i + s
  being op ``_GEOMETRIC_OPS[i]`` with sign -1 if s else +1; shifts[j] is (dy, dx) when
  map j is exactly a whole-pixel translation (cheaper to apply by slicing), else None.
  With static H and W the maps are computed once, eagerly, and embedded as a
  constant; otherwise they are computed in the graph and none counts as a shift.
  """
  if isinstance(height, int) and isinstance(width, int):
    plan = None
    with tf.init_scope():
      if tf.executing_eagerly():
        plan = _static_geometric_plan(float(magnitude), height, width)
    if plan is not None:
      return tf.constant(plan[0]), plan[1]
  return _geometric_maps(magnitude, height, width), (None,) * (2 * len(_GEOMETRIC_OPS))


@functools.lru_cache(maxsize=16)
def _static_geometric_plan(
    magnitude: float, height: int,
    width: int) -> tuple[np.ndarray, tuple[tuple[int, int] | None, ...]]:
  maps = _geometric_maps(magnitude, height, width).numpy()
  return maps, tuple(_as_shift(map_, height, width) for map_ in maps)


def _as_shift(map_: np.ndarray, height: int, width: int) -> tuple[int, int] | None:
  """(dy, dx) if map_ takes every output pixel (y, x) from (y + dy, x + dx), else None."""
  count = height * width
  inside = np.flatnonzero(map_ < count)
  if inside.size:
    dy = map_[inside[0]] // width - inside[0] // width
    dx = map_[inside[0]] % width - inside[0] % width
  else:
    dy, dx = height, 0  # All fill.
  rows = np.arange(height)[:, None] + dy
  cols = np.arange(width)[None, :] + dx
  valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
  shifted = np.where(valid, rows * width + cols, count).ravel()
  return (int(dy), int(dx)) if np.array_equal(shifted, map_) else None


def _geometric_maps(magnitude: float, height: Any, width: Any) -> tf.Tensor:
  args = op_arguments(magnitude)
  transforms = []
  for name in _GEOMETRIC_OPS:
    for sign in (1.0, -1.0):
      # The same float64 product apply_op forms, so the transforms agree bit for bit.
      value = tf.constant(sign, tf.float64) * args[name]
      transforms.append(_geometric_transform(name, value, height, width))
  return _pixel_maps(tf.stack(transforms), height, width)


def _layer_kernels(
    magnitude: float, channels: tf.Tensor
) -> dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None]:
  """The non-geometric ops at m, as functions of (sub-batch, its draws).

  Args:
    magnitude: m >= 0, a Python number.
    channels: ``_lut_channels`` of the images, shared by the LUT ops.

  Returns:
    {op name: fn(uint8 [k, H, W, 3], int32 [k, 4] draws) -> uint8 [k, H, W, 3], or None
    where the op is the identity at m (its images then pass through untouched)}. The
    draws columns are (negative, Cutout row, Cutout column, geometric map index).
  """
  args = op_arguments(magnitude)

  def enhance(fn: Callable[..., tf.Tensor], factor: float):
    # The float32 blend with factor 1 returns the image exactly (small integers).
    if np.float32(factor) == 1.0:
      return None
    return lambda images, draws: fn(images, factor)

  return {
      'AutoContrast': lambda images, draws: _auto_contrast_batch(images, channels),
      'Equalize': lambda images, draws: _equalize_batch(images, channels),
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


def _layer_groups(
    op_indices: tf.Tensor, draws: tf.Tensor, magnitude: float, plan: tuple[Any, Any],
    channels: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, list[Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None]]:
  """Sorts the images of one layer into groups that get the same treatment.

  Group 0 passes images through (ops that are the identity at this magnitude), every
  other non-geometric op has a group, so does each geometric map that is a plain
  shift, and the other geometric maps share one (a gather through per-image maps).

  Args:
    op_indices: int32 [B], values in [0, NUM_OPS).
    draws: int32 [B, 3]: per image 1 if a signed op takes its negative argument else
      0, and the Cutout centre row and column.
    magnitude: m >= 0, a Python number.
    plan: ``_geometric_plan(magnitude, H, W)``.
    channels: ``_lut_channels`` of the images.

  Returns:
    (groups int32 [B], group draws int32 [B, 4] (``draws`` plus the geometric map
    index), [fn(sub-batch, its group draws) or None for group 0, per group]).
  """
  maps, shifts = plan
  kernels = _layer_kernels(magnitude, channels)
  group_fns: list[Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None] = [None]
  group_of: dict[Any, int] = {}

  def group(key: Any, fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None) -> int:
    if fn is None:
      return 0
    if key not in group_of:
      group_of[key] = len(group_fns)
      # A name scope per group (op name, 'remap' or the shift) labels profiles.
      label = key if isinstance(key, str) else f'shift_{key[0]}_{key[1]}'.replace('-', 'm')

      def scoped(part, part_draws, fn=fn, label=label):
        with tf.name_scope(label):
          return fn(part, part_draws)

      group_fns.append(scoped)
    return group_of[key]

  # Tables over 2 * op index + negative.
  group_of_key, map_of_key = [], []
  for name in OP_NAMES:
    for negative in (0, 1):
      if name in SIGNED_OPS:
        map_index = 2 * _GEOMETRIC_OPS.index(name) + negative
        shift = shifts[map_index]
        if shift is None:
          fn = lambda part, part_draws: _remap_batch(part, tf.gather(maps, part_draws[:, 3]))
          group_of_key.append(group('remap', fn))
        elif shift == (0, 0):
          group_of_key.append(0)
        else:
          fn = lambda part, part_draws, shift=shift: _shift_batch(part, *shift)
          group_of_key.append(group(shift, fn))
        map_of_key.append(map_index)
      else:
        group_of_key.append(group(name, kernels[name]))
        map_of_key.append(0)
  draws = tf.cast(draws, tf.int32)
  key = 2 * tf.cast(op_indices, tf.int32) + draws[:, 0]
  map_index = tf.gather(tf.constant(map_of_key, tf.int32), key)
  groups = tf.gather(tf.constant(group_of_key, tf.int32), key)
  return groups, tf.concat([draws, map_index[:, None]], axis=1), group_fns


def _augment_layers(images: tf.Tensor, op_indices: tf.Tensor, draws: tf.Tensor,
                    magnitude: float, plan: tuple[Any, Any] | None = None) -> tf.Tensor:
  """RandAugment layers on a batch: layer l gives image i op ``OP_NAMES[op_indices[i, l]]``.

  Each layer runs every op once, on the sub-batch of images that drew it. Instead of
  putting the batch back in order after every layer (a full copy) and splitting it
  again (another), each layer's outputs are stitched straight into the order the next
  layer's groups need, and cut apart there with tf.split.

  Args:
    images: uint8 [B, H, W, 3].
    op_indices: int32 [B, L], values in [0, NUM_OPS).
    draws: int32 [B, L, 3]: per image and layer 1 if a signed op takes its negative
      argument else 0, and the Cutout centre row and column (see ``_image_draws``).
    magnitude: m >= 0, a Python number.
    plan: ``_geometric_plan(magnitude, H, W)``, or None to make it here.

  Returns:
    uint8 [B, H, W, 3].
  """
  shape = tf.shape(images)
  if plan is None:
    plan = _geometric_plan(
        magnitude, images.shape[1] if images.shape[1] is not None else shape[1],
        images.shape[2] if images.shape[2] is not None else shape[2])
  channels = _lut_channels(images)
  outputs, positions = None, None
  for layer in range(op_indices.shape[1]):
    groups, group_draws, group_fns = _layer_groups(
        op_indices[:, layer], draws[:, layer], magnitude, plan, channels)
    count = len(group_fns)
    new_positions = tf.dynamic_partition(tf.range(shape[0]), groups, count)
    if outputs is None:
      parts = tf.dynamic_partition(images, groups, count)
    else:
      # rank[i]: where image i goes in this layer's group order.
      rank = tf.math.invert_permutation(tf.concat(new_positions, 0))
      ordered = tf.dynamic_stitch([tf.gather(rank, p) for p in positions], outputs)
      sizes = tf.stack([tf.shape(p)[0] for p in new_positions])
      parts = tf.split(ordered, sizes, num=count)
    positions = new_positions
    draw_parts = tf.dynamic_partition(group_draws, groups, count)
    outputs = [part if fn is None else fn(part, part_draws)
               for fn, part, part_draws in zip(group_fns, parts, draw_parts)]
  if outputs is None:
    return images
  out = tf.dynamic_stitch(positions, outputs)
  out.set_shape(images.shape)
  return out


def _apply_layer_batch(images: tf.Tensor, op_indices: tf.Tensor, draws: tf.Tensor,
                       magnitude: float, plan: tuple[Any, Any] | None = None) -> tf.Tensor:
  """One RandAugment layer on a batch: image i gets op ``OP_NAMES[op_indices[i]]``.

  Equal to ``apply_op(images[i], op_indices[i], magnitude, op_seed)`` for every i
  when ``draws[i]`` is what ``op_seed`` draws (see ``_op_draws``).

  Args:
    images: uint8 [B, H, W, 3].
    op_indices: int32 [B], values in [0, NUM_OPS).
    draws: int32 [B, 3]: per image 1 if a signed op takes its negative argument else
      0, and the Cutout centre row and column.
    magnitude: m >= 0, a Python number.
    plan: ``_geometric_plan(magnitude, H, W)``, or None to make it here.

  Returns:
    uint8 [B, H, W, 3].
  """
  return _augment_layers(images, op_indices[:, None], draws[:, None], magnitude, plan)


@_no_autograph
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
  if num_layers == 0 or images.shape[0] == 0:
    return images
  shape = tf.shape(images)
  if images.shape[0] is None or seeds.shape[0] is None:
    with tf.control_dependencies([tf.debugging.assert_equal(
        tf.shape(seeds)[0], shape[0],
        message='randaugment_batch: seeds must have one row per image')]):
      seeds = tf.identity(seeds)
  height = images.shape[1] if images.shape[1] is not None else shape[1]
  width = images.shape[2] if images.shape[2] is not None else shape[2]
  if images.shape[0] is not None:
    # A static batch size (tf.data with drop_remainder=True) unrolls the per-seed
    # draws, which saves map_fn's loop overhead.
    draws = tf.stack([_image_draws(seed, num_layers, height, width)
                      for seed in tf.unstack(seeds, num=images.shape[0])])
  else:
    draws = tf.map_fn(
        lambda seed: _image_draws(seed, num_layers, height, width), seeds,
        fn_output_signature=tf.TensorSpec([num_layers, 4], tf.int32))
  return _augment_layers(images, draws[..., 0], draws[..., 1:], magnitude,
                         _geometric_plan(magnitude, height, width))
