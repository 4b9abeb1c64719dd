"""The sixteen RandAugment ops on batches of uint8 RGB images, each as Pillow defines it.

Every op maps uint8 [k, H, W, 3] to the same shape and dtype with one argument for the
whole batch (``cutout`` takes a centre per image). Each follows the Pillow function it
is named after (``PIL.ImageOps`` / ``PIL.ImageEnhance`` / ``Image.transform`` with
NEAREST resampling), which the tests check pixel by pixel; the docstrings give the exact
semantics. Geometric ops and Cutout fill uncovered pixels with grey ``FILL_VALUE``.

The geometric ops are pixel maps: ``geometric_transform`` gives an op's transform,
``pixel_maps`` the input pixel each output pixel takes, and ``remap`` (or ``shift``,
for a whole-pixel translation) applies a map; ``randaugment`` computes the maps once per
(magnitude, H, W) and reuses them for every image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

FILL_VALUE = 128
# The ops that take a signed argument, in the order of ``randaugment.OP_NAMES``.
GEOMETRIC_OPS: tuple[str, ...] = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


def _to_uint8(x: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  """Clips float32 to 0..255 and truncates to uint8, like Pillow's float -> UINT8 stores."""
  # The fused kernel makes one pass over the image; tf.clip_by_value makes two.
  x = tf.raw_ops.ClipByValue(
    t=x, clip_value_min=tf.constant(0.0), clip_value_max=tf.constant(255.0)
  )
  x = tf.cast(x, tf.uint8)
  x.set_shape(like.shape)
  return x


def lut_channels(images: tf.Tensor) -> tf.Tensor:
  """int32 [H * W * 3]: 256 * channel of each value of an image, flattened.

  A constant for static shapes: computing it costs as much as the rest of
  ``_lut_index``, and the batched path would pay that in every layer even for empty
  sub-batches.
  """
  if images.shape[-3] is not None and images.shape[-2] is not None:
    return tf.constant(
      np.tile(np.array([0, 256, 512], np.int32), images.shape[-3] * images.shape[-2])
    )
  shape = tf.shape(images)
  return (tf.range(shape[-3] * shape[-2] * 3) % 3) * 256


def _lut_index(images: tf.Tensor, channels: tf.Tensor | None = None) -> tf.Tensor:
  """int32 [k, H * W * 3]: value + 256 * (3 * image + channel), into [k, 3, 256] LUTs.

  ``channels`` is ``lut_channels(images)`` when the caller already has it.
  """
  if channels is None:
    channels = lut_channels(images)
  shape = tf.shape(images)
  # The offsets are added as one [k, H * W * 3] tensor: broadcasting a [3] per-channel
  # offset along the inner dimension is several times slower in TF.
  offsets = channels + 768 * tf.range(shape[0])[:, None]
  return tf.reshape(tf.cast(images, tf.int32), tf.shape(offsets)) + offsets


def _apply_luts(images: tf.Tensor, luts: tf.Tensor, index: tf.Tensor | None = None) -> tf.Tensor:
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


def auto_contrast(images: tf.Tensor, channels: tf.Tensor | None = None) -> tf.Tensor:
  """Per-channel ``PIL.ImageOps.autocontrast(image)`` (cutoff 0) of each image.

  Each channel's [min, max] is stretched to [0, 255] through Pillow's lookup table
  ``int(i * scale + offset)`` with ``scale = 255.0 / (max - min)``, ``offset = -min *
  scale``, evaluated in float64 exactly as Pillow does. That double-precision rounding
  occasionally maps a value one below the exact integer rescale (e.g. max -> 254 for
  [0, 25]); it is kept so that the op is bit-identical to Pillow. A channel with
  max == min is left unchanged.

  Args:
    images: uint8 [k, H, W, 3].
    channels: ``lut_channels(images)`` when the caller already has it.

  Returns:
    uint8 [k, H, W, 3].
  """
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


def equalize(images: tf.Tensor, channels: tf.Tensor | None = None) -> tf.Tensor:
  """Per-channel histogram equalisation of each image, as ``PIL.ImageOps.equalize``.

  For each channel with histogram h: step = (count - h[last non-empty bin]) // 255;
  if step == 0 the channel is unchanged, else value i maps to
  min(255, (step // 2 + sum(h[:i])) // step).

  Args:
    images: uint8 [k, H, W, 3].
    channels: ``lut_channels(images)`` when the caller already has it.

  Returns:
    uint8 [k, H, W, 3].
  """
  k = tf.shape(images)[0]
  index = _lut_index(images, channels)
  # The LUT index doubles as the histogram bin: one bincount for all images/channels.
  hist = tf.reshape(
    tf.math.bincount(tf.reshape(index, [-1]), minlength=768 * k, maxlength=768 * k, dtype=tf.int32),
    [k, 3, 256],
  )
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


def invert(images: tf.Tensor) -> tf.Tensor:
  """255 - x, as ``PIL.ImageOps.invert``."""
  return tf.constant(255, tf.uint8) - images


def posterize(images: tf.Tensor, bits: Any) -> tf.Tensor:
  """Keeps the top ``bits`` bits of every value: x & ~(2**(8 - bits) - 1).

  As ``PIL.ImageOps.posterize``. ``bits`` (int or int scalar tensor) is clipped to
  [0, 8]: 0 gives all-black images, 8 leaves them unchanged.
  """
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
  return tf.bitwise.bitwise_and(images, mask)


def _threshold_mask(images: tf.Tensor, threshold: Any, *, below: bool = False) -> tf.Tensor:
  """uint8, 0xFF where images >= threshold (any int) and 0 elsewhere; or < if below.

  Masks combined with bitwise ops replace tf.where, which is many times slower on
  uint8 images; everything stays in uint8.
  """
  threshold = tf.convert_to_tensor(threshold)
  known = tf.get_static_value(threshold)
  if known is not None and not 0 < known < 256:
    return tf.fill(tf.shape(images), tf.constant(255 if (known <= 0) != below else 0, tf.uint8))
  clipped = tf.clip_by_value(tf.cast(threshold, tf.int32), 0, 256)
  at_or_above = tf.cast(images >= tf.cast(tf.minimum(clipped, 255), tf.uint8), tf.uint8)
  if known is None:
    # A threshold of 256 (or more) is above every value, but was compared as 255.
    at_or_above *= tf.cast(clipped <= 255, tf.uint8)
  # 1 - 1 = 0 and 0 - 1 = 0xFF in uint8. (Not 0 - x for the other mask: graph
  # optimisation turns that into Neg, which has no uint8 kernel.)
  return at_or_above - 1 if below else at_or_above * 255


def solarize(images: tf.Tensor, threshold: Any) -> tf.Tensor:
  """Inverts values >= threshold, as ``PIL.ImageOps.solarize``.

  ``threshold`` is an int or int scalar tensor; 256 or more leaves the images unchanged.
  """
  # x ^ 0xFF is 255 - x.
  return tf.bitwise.bitwise_xor(images, _threshold_mask(images, threshold))


def solarize_add(images: tf.Tensor, addition: Any, threshold: Any) -> tf.Tensor:
  """Adds ``addition`` to values below ``threshold``, clipping to 0..255.

  Values >= threshold are unchanged. (No Pillow counterpart; from the AutoAugment /
  RandAugment op set of the reference implementations.) Both arguments are ints or int
  scalar tensors.
  """
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
    return tf.maximum(
      images, tf.bitwise.bitwise_and(added, _threshold_mask(images, threshold, below=True))
    )
  subtract = tf.cast(tf.maximum(-addition, 0), tf.uint8)
  add = tf.cast(tf.maximum(addition, 0), tf.uint8)
  added = (
    tf.minimum(tf.maximum(images, subtract) - subtract, tf.constant(255, tf.uint8) - add) + add
  )
  # x ^ ((x ^ y) & mask) is y where the mask is 0xFF and x where it is 0.
  below = _threshold_mask(images, threshold, below=True)
  return tf.bitwise.bitwise_xor(
    images, tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(images, added), below)
  )


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


def color(images: tf.Tensor, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Color(image).enhance(factor)``: blend with the greyscale image.

  ``factor`` (float or float scalar tensor): 0 gives greyscale, 1 the images unchanged.
  """
  # Broadcasting the grey plane along the inner channel dimension is slow in TF; doing
  # it once, up front, beats letting both the subtraction and the addition do it.
  grey = tf.broadcast_to(_grayscale(_planes(images))[..., None], tf.shape(images))
  return _blend(grey, images, factor)


def contrast(images: tf.Tensor, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Contrast(image).enhance(factor)``: blend with the mean grey.

  The grey level is Pillow's: the mean of the greyscale (L) image rounded as
  int(mean + 0.5), computed here exactly in integers. ``factor`` (float or float scalar
  tensor): 0 gives flat grey, 1 the images unchanged.
  """
  total = tf.reduce_sum(tf.cast(_grayscale(_planes(images)), tf.int64), axis=[1, 2])
  shape = tf.shape(images, out_type=tf.int64)
  count = shape[1] * shape[2]
  mean = (2 * total + count) // tf.maximum(2 * count, 1)
  return _blend(mean[:, None, None, None], images, factor)


def brightness(images: tf.Tensor, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Brightness(image).enhance(factor)``: blend with black.

  ``factor`` (float or float scalar tensor): 0 gives black, 1 the images unchanged.
  """
  # _blend with black: 0 + f * (x - 0) is exactly f * x in float32, in one multiply.
  return _to_uint8(tf.cast(factor, tf.float32) * tf.cast(images, tf.float32), images)


def sharpness(images: tf.Tensor, factor: Any) -> tf.Tensor:
  """``PIL.ImageEnhance.Sharpness(image).enhance(factor)``: blend with a smoothed image.

  The smoothed image is Pillow's ``ImageFilter.SMOOTH``: the 3x3 kernel
  [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 rounded to the nearest integer on interior
  pixels, and the one-pixel border copied from the input (so the border is unchanged
  for every factor, and images less than 3 pixels high or wide are returned as is).
  ``factor`` (float or float scalar tensor): 0 gives the smoothed images, 1 the images
  unchanged, > 1 sharpens.
  """
  shape = tf.shape(images)
  height, width = shape[1], shape[2]
  # Rows of W * 3 values: a pixel's horizontal neighbours are 3 values away. The row
  # slices are taken in uint8 and cast after: TF copies such slices of float32 tensors
  # several times slower.
  flat = tf.reshape(images, [shape[0], height, width * 3])
  above, middle, below = (
    tf.cast(flat[:, :-2], tf.float32),
    tf.cast(flat[:, 1:-1], tf.float32),
    tf.cast(flat[:, 2:], tf.float32),
  )
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
    [middle[:, :, :3], interior, middle[:, :, tf.maximum(width - 1, 1) * 3 :]], axis=2
  )
  out = tf.concat([flat[:, :1], middle, flat[:, tf.maximum(height - 1, 1) :]], axis=1)
  out = tf.reshape(out, shape)
  out.set_shape(images.shape)
  return out


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
  transform = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), zero, zero])
  return tf.cast(transform, tf.float32)


def geometric_transform(name: str, value: Any, height: Any, width: Any) -> tf.Tensor:
  """The transform row (float32 [8]) of geometric op ``name`` with signed argument.

  ``Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=128)`` for:
    'Rotate': ``Image.rotate(value, NEAREST, fillcolor=128)``: about the image centre,
      positive angles (degrees) counter-clockwise as displayed, the size kept;
    'ShearX': output (x, y) samples input (x + value * y, y), matrix (1, v, 0, 0, 1, 0);
    'ShearY': output (x, y) samples input (x, y + value * x), matrix (1, 0, 0, v, 1, 0);
    'TranslateX': output (x, y) samples input (x + value, y) (positive moves the
      content left), matrix (1, 0, v, 0, 1, 0);
    'TranslateY': output (x, y) samples input (x, y + value) (positive moves the
      content up), matrix (1, 0, 0, 0, 1, v).
  ``height`` and ``width`` matter for 'Rotate' only (its centre).
  """
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
    raise ValueError(f'{name} is not a geometric op; those are {GEOMETRIC_OPS}.')
  return _projective_transform(matrix)


def pixel_maps(transforms: tf.Tensor, height: Any, width: Any) -> tf.Tensor:
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
    transforms=transforms,
    output_shape=tf.stack([height, width]),
    fill_value=tf.constant(-1.0, tf.float32),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )
  maps = tf.reshape(maps, [tf.shape(transforms)[0], count])
  return tf.where(maps < 0, count, maps)


def remap(images: tf.Tensor, maps: tf.Tensor) -> tf.Tensor:
  """images[i] remapped through maps[i] (int32 [k, H * W], from ``pixel_maps``)."""
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


def shift(images: tf.Tensor, dy: int, dx: int) -> tf.Tensor:
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

  out = images[:, top + dy : bottom + dy, left + dx : right + dx]
  if left > 0 or right < width:
    out = tf.concat([fill(bottom - top, left), out, fill(bottom - top, width - right)], 2)
  if top > 0 or bottom < height:
    out = tf.concat([fill(top, width), out, fill(height - bottom, width)], 1)
  out.set_shape(images.shape)
  return out


def cutout(images: tf.Tensor, pad_size: Any, centres: tf.Tensor) -> tf.Tensor:
  """Fills a square of side 2 * pad_size around centres[i], clipped to the image, with
  grey 128 in images[i].

  With centre (cy, cx) = centres[i] (int32 [k, 2]: row, column), the filled box is rows
  [cy - pad_size, cy + pad_size) x columns [cx - pad_size, cx + pad_size). pad_size 0
  leaves the images unchanged.
  """
  shape = tf.shape(images)
  pad_size = tf.cast(pad_size, tf.int32)
  cy, cx = centres[:, :1], centres[:, 1:]
  rows, cols = tf.range(shape[1])[None, :], tf.range(shape[2])[None, :]
  in_rows = (rows >= cy - pad_size) & (rows < cy + pad_size)
  in_cols = (cols >= cx - pad_size) & (cols < cx + pad_size)
  # 0xFF inside the box and 0 outside, as a [k, H, 1] and a [k, 1, W * 3] byte mask:
  # broadcasting along whole rows is fast, unlike along the inner channel dimension.
  row_mask = tf.cast(in_rows, tf.uint8)[:, :, None] * 255
  col_mask = tf.reshape(
    tf.broadcast_to(tf.cast(in_cols, tf.uint8)[:, None, :, None] * 255, [shape[0], 1, shape[2], 3]),
    [shape[0], 1, shape[2] * 3],
  )
  flat = tf.reshape(images, [shape[0], shape[1], shape[2] * 3])
  # x ^ ((x ^ 128) & mask) is 128 where the mask is 0xFF and x where it is 0: a select
  # without tf.where, which is many times slower on uint8 images.
  box = tf.bitwise.bitwise_and(
    tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(flat, FILL_VALUE), col_mask), row_mask
  )
  out = tf.reshape(tf.bitwise.bitwise_xor(flat, box), shape)
  out.set_shape(images.shape)
  return out
