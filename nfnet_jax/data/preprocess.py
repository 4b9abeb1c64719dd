"""Per-image ImageNet preprocessing: decoding, the training crop/flip and the eval resizes.

Everything except ``eval_image`` is made of TensorFlow ops that work in graph mode
(``tf.data.Dataset.map``). Randomness is stateless: a seed (int32/int64 [2]) fully
determines the output, whatever the map's parallelism. ``decoded_image_preprocess`` is
the per-example step of every source whose examples are encoded images (TFDS, folders).

Decoding (``decode_rgb``): JPEG (colour, grayscale, CMYK/YCCK), PNG (8/16-bit, gray,
gray+alpha, palette, RGBA), GIF (first frame), BMP and WebP -> uint8 [H, W, 3].
  * JPEG uses libjpeg's accurate integer IDCT (``JPEG_DCT_METHOD``). TF's default
    (``''``, which TF maps to INTEGER_FAST) differs from libjpeg/PIL by up to ~12 levels
    on high-quality JPEGs; the accurate IDCT decodes bit-identically to PIL (measured 0)
    at the same speed. The DeepMind NFNet pipeline used TF's default; the difference is
    JPEG-noise sized.
  * CMYK JPEGs decode to RGB inside TF (``channels=3``: TF asks libjpeg for CMYK and
    converts it itself, R = (255 - C) * (255 - K) / 255 truncated where PIL rounds); this
    matches PIL's ``convert('RGB')`` to within 1 level.
  * Alpha is dropped, not composited. 16-bit PNGs keep the high byte (v >> 8, libpng's
    strip_16). EXIF orientation is ignored (as by TF, PIL's ``open`` and the references).
  * Truncated JPEGs: TF's full decode fails on them, but ``decode_and_crop_jpeg`` succeeds
    when the crop window lies in the rows before the cut and fails otherwise, so a random
    training crop would crash the epoch at random. Every JPEG path therefore first checks
    the byte stream for an end-of-image marker (FF D9) after the last start-of-scan marker
    (FF DA) and fails with "truncated JPEG" otherwise (byte stuffing guarantees neither
    marker occurs inside entropy-coded data; data appended after the end-of-image marker
    that happens to contain FF DA would be rejected too). Corruption that libjpeg only
    warns about (bad bytes inside a scan or between markers) still decodes, as in every TF
    pipeline: TF does not expose libjpeg's warnings.
  * Undecodable input raises ``tf.errors.InvalidArgumentError`` from the op (``eval_image``
    turns it into a one-line ``ValueError``). A pipeline stays alive only if such files
    are dropped up front, as the folder source does when it first opens a split.

Training (``train_image``): inception crop + left-right flip + bicubic resize to S x S,
clipped to [0, 255] (RandAugment later needs uint8 and bicubic overshoots).
  * The crop window comes from ``tf.image.stateless_sample_distorted_bounding_box`` with
    ``INCEPTION_CROP``; with the whole image as the "object", min_object_covered=0.1 makes
    the effective minimum area 10%, not 8% (as in the reference pipelines). The sampler
    rounds width = lrint(height * aspect), so the pixel aspect can leave [3/4, 4/3] by up
    to half a pixel.
  * When all attempts fail, the sampler returns the whole image. Like the TF TPU ResNet
    and DeepMind NFNet pipelines, a window equal to the whole image (height and width)
    means "sampling failed" (even when the whole image was a legitimate sample) and is
    replaced by a centre crop of side floor(min(H, W) * S / (S + 32)) (at least 1) at
    offsets ((H - side + 1) // 2, (W - side + 1) // 2). The references compare all three
    dims of the JPEG header shape, so they never fall back on grayscale JPEGs; we compare
    height and width only.
  * JPEGs are cropped with the fused ``decode_and_crop_jpeg`` (only the window's MCU rows
    and columns are decoded). libjpeg-turbo's cropped decode replicates chroma at the
    window's left/right edges instead of interpolating from the neighbouring column when
    chroma is subsampled, which changed edge pixels by up to 67 levels on a synthetic
    image with strong chroma detail (whenever the window starts or ends on an MCU
    boundary). We decode
    ``_JPEG_CROP_MARGIN`` extra columns on each side and slice them off, which makes the
    fused crop equal a full decode + crop exactly.

Evaluation (``eval_preprocess`` in graph mode, ``eval_image`` eager on bytes):
  * 'resize_crop_32' (the NFNet reference): decode the whole image, bicubic resize to
    (S + 32, S + 32) ignoring the aspect ratio, centre crop S x S at offset 16.
  * 'crop_resize' (the released code's default, which its NF-RegNet/NF-ResNet
    experiments use): the training fallback's centre square, side
    floor(min(H, W) * S / (S + 32)), then bicubic resize to S x S (aspect kept).
  * 'crop_pct' (timm's geometry): resize the shorter side to floor(S / crop_pct) and the
    longer to int(floor(S / crop_pct) * long / short) (torchvision's ``Resize(int)``),
    centre crop S x S at offsets round((H' - S) / 2), round((W' - S) / 2) with Python's
    round-half-to-even (torchvision's ``CenterCrop``; ``tf.round`` rounds the same way).
    Only the geometry is timm's: the resize is the same TF bicubic as everywhere else,
    not PIL's antialiased one, so pixels differ from timm's.
  * All three then normalise with the ImageNet mean/std (``normalize_image``).

Resizing is ``tf.image.resize(..., 'bicubic', antialias=False)`` everywhere, i.e. TF's
ResizeBicubic with half-pixel centres: Keys' cubic with a = -0.5, the fractional sample
position rounded to 1/1024 (TF's coefficient table), and taps that fall outside the image
get weight 0 with the remaining weights renormalised to sum to 1 (not edge replication).
No antialiasing when downscaling, and eval output is not clipped (overshoot is kept, as in
the reference). ``jax.image.resize`` and PIL's bicubic antialias when downscaling and give
different pixels.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import ml_collections
import numpy as np
import tensorflow as tf

from nfnet_jax import fileio
from nfnet_jax.data import sources

# ImageNet normalisation (as in DeepMind's released nfnets/dataset.py), in 0..255 units.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

INCEPTION_CROP = dict(
  area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.1, max_attempts=10
)
EVAL_METHODS = ('resize_crop_32', 'crop_resize', 'crop_pct')
# Pixels added around the centre crop at evaluation (and in the training fallback).
CROP_PADDING = 32
JPEG_DCT_METHOD = 'INTEGER_ACCURATE'
SUPPORTED_FORMATS = ('jpeg', 'png', 'gif', 'bmp', 'webp')
# Extra columns decoded on each side of a fused JPEG crop. Fancy upsampling needs the
# neighbouring chroma sample, which is at most 4 pixels away (4:1:1 subsampling).
_JPEG_CROP_MARGIN = 8
_UNDECODABLE = (
  'Cannot decode image: the image is corrupt or not a supported format '
  '(JPEG, PNG, GIF, BMP or WebP)'
)


# ---------------------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------------------


def image_format(image_bytes: tf.Tensor) -> tf.Tensor:
  """The container format from the leading bytes: a tf.string scalar, one of
  ``SUPPORTED_FORMATS`` or 'unknown'."""
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  # Padding the (at most 12-byte) head lets fixed-position slices work on short inputs;
  # tf.strings.substr raises when the position is past the end.
  head = tf.strings.join([tf.strings.substr(image_bytes, 0, 12), b'\0' * 12])

  def starts(pos, magic):
    return tf.equal(tf.strings.substr(head, pos, len(magic)), magic)

  conditions = [
    ('jpeg', tf.io.is_jpeg(image_bytes)),
    ('png', starts(0, b'\x89PNG\r\n\x1a\n')),
    ('gif', starts(0, b'GIF87a') | starts(0, b'GIF89a')),
    ('bmp', starts(0, b'BM')),
    ('webp', starts(0, b'RIFF') & starts(8, b'WEBP')),
  ]
  fmt = tf.constant('unknown')
  for name, cond in reversed(conditions):
    fmt = tf.where(cond, tf.constant(name), fmt)
  return fmt


def _jpeg_is_complete(image_bytes: tf.Tensor) -> tf.Tensor:
  """True iff an end-of-image marker follows the last start-of-scan marker."""

  def scan_markers():
    # Literal byte separators (a regex would be read as UTF-8): a memchr-speed scan,
    # about 0.1 ms for a typical ImageNet JPEG against ~1 ms to decode it.
    scans = tf.strings.split(image_bytes, sep=b'\xff\xda')
    after_last_scan = tf.strings.split(scans[-1], sep=b'\xff\xd9')
    return (tf.size(scans) > 1) & (tf.size(after_last_scan) > 1)

  # Almost every file ends with its end-of-image marker: then the entropy-coded data
  # before it is complete (a file cut right after an embedded thumbnail's marker has no
  # main scan at all, and the decoder rejects it). Only other endings need the scan.
  ends_with_eoi = tf.equal(
    tf.strings.substr(tf.strings.join([b'\0\0', image_bytes]), -2, 2), b'\xff\xd9'
  )
  return tf.cond(ends_with_eoi, lambda: tf.constant(True), scan_markers)


def _with_check(condition: tf.Tensor, message: str, value: tf.Tensor) -> tf.Tensor:
  # An explicit control dependency: tf.data map functions may prune an unused Assert.
  with tf.control_dependencies([tf.debugging.Assert(condition, [message])]):
    return tf.identity(value)


def _check_complete_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
  return _with_check(
    _jpeg_is_complete(image_bytes),
    f'{_UNDECODABLE}: truncated JPEG (no end-of-image marker after the last scan).',
    image_bytes,
  )


def _decode_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
  image_bytes = _check_complete_jpeg(image_bytes)
  return tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT_METHOD)


def _decode_other(image_bytes: tf.Tensor) -> tf.Tensor:
  """PNG, GIF, BMP, WebP (anything but JPEG) -> uint8 [H, W, 3]."""
  image_bytes = _with_check(
    tf.not_equal(image_format(image_bytes), 'unknown'),
    f'{_UNDECODABLE}: unrecognised leading bytes.',
    image_bytes,
  )
  image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded image (tf.string scalar) -> uint8 [H, W, 3]; see the module docstring.

  Raises (when run) ``tf.errors.InvalidArgumentError`` for undecodable input, with a
  message that starts with "Cannot decode image" for unknown formats and truncated JPEGs.
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  image = tf.cond(
    tf.io.is_jpeg(image_bytes),
    lambda: _decode_jpeg(image_bytes),
    lambda: _decode_other(image_bytes),
  )
  image.set_shape([None, None, 3])
  return image


def _error_line(error: tf.errors.OpError) -> str:
  """The informative part of a TF op error (drops the function-node prefix and op name)."""
  message = error.message
  if _UNDECODABLE in message:  # One of our own checks: "assertion failed: [<message>]".
    message = message[message.index(_UNDECODABLE) :]
    return message.split('\n')[0].rstrip(' ]').rstrip()
  # Eager errors are one line; graph errors wrap the op's message in a traceback (indented
  # lines) between "Graph execution error:" / "Detected at node ..." and "\t [[node]]".
  lines = [
    line
    for line in message.split('\n')
    if line.strip()
    and not line[0].isspace()
    and not line.startswith(('Graph execution error', 'Detected at node'))
  ]
  message = lines[-1] if lines else message
  if '}}' in message:
    message = message.rsplit('}}', 1)[1]
  message = message.split(' [Op:')[0].strip()
  return f'{_UNDECODABLE}: {message}'


# ---------------------------------------------------------------------------------------
# Training: inception crop, flip, resize.
# ---------------------------------------------------------------------------------------


def centre_crop_window(image_shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """The fallback window [offset_y, offset_x, side, side] (int32): a centred square of
  side floor(min(H, W) * S / (S + 32)), at least 1."""
  shape = tf.cast(image_shape, tf.int32)
  height, width = shape[0], shape[1]
  # Integer arithmetic: the references compute this product in float32, which agrees
  # except when rounding lands just below an integer.
  side = tf.maximum(tf.minimum(height, width) * image_size // (image_size + CROP_PADDING), 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def inception_crop_window(image_shape: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
  """The training crop window [offset_y, offset_x, height, width] (int32).

  Args:
    image_shape: [H, W] or [H, W, C] of the image (e.g. ``tf.image.extract_jpeg_shape``).
    seed: int32/int64 [2] stateless seed.
    image_size: the training size S (for the centre-crop fallback).
  """
  shape = tf.cast(image_shape, tf.int32)
  height, width = shape[0], shape[1]
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.stack([height, width, 3]),
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
    seed=seed,
    use_image_if_no_bounding_boxes=True,
    **INCEPTION_CROP,
  )
  sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
  # The sampler signals failure only by returning the whole image (channels -1).
  failed = tf.equal(size[0], height) & tf.equal(size[1], width)
  return tf.where(failed, centre_crop_window(shape, image_size), sampled)


def _decode_and_crop_jpeg(
  checked_bytes: tf.Tensor, window: tf.Tensor, full_width: tf.Tensor
) -> tf.Tensor:
  """Fused decode of ``window`` from a JPEG already checked for truncation."""
  offset_y, offset_x, height, width = tf.unstack(tf.cast(window, tf.int32))
  x0 = tf.maximum(offset_x - _JPEG_CROP_MARGIN, 0)
  x1 = tf.minimum(offset_x + width + _JPEG_CROP_MARGIN, full_width)
  wide = tf.image.decode_and_crop_jpeg(
    checked_bytes, tf.stack([offset_y, x0, height, x1 - x0]), channels=3, dct_method=JPEG_DCT_METHOD
  )
  return wide[:, offset_x - x0 : offset_x - x0 + width]


def _slice(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  window = tf.cast(window, tf.int32)
  return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])


def resize_bicubic(image: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor) -> tf.Tensor:
  """TF's bicubic (no antialiasing, no clipping) -> float32 [height, width, C]."""
  return tf.image.resize(image, tf.stack([height, width]), method='bicubic', antialias=False)


def inception_crop(image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 [h, w, 3]: the window of ``inception_crop_window``, decoded once (for JPEGs
  only the header and the window; other formats are decoded fully, then sliced)."""

  def jpeg():
    checked = _check_complete_jpeg(image_bytes)
    shape = tf.image.extract_jpeg_shape(checked)  # Header only.
    return _decode_and_crop_jpeg(checked, inception_crop_window(shape, seed, image_size), shape[1])

  def other():
    image = _decode_other(image_bytes)
    return _slice(image, inception_crop_window(tf.shape(image), seed, image_size))

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  crop.set_shape([None, None, 3])
  return crop


def _resize_and_clip(image: tf.Tensor, image_size: int) -> tf.Tensor:
  image = resize_bicubic(image, image_size, image_size)
  image = tf.clip_by_value(image, 0.0, 255.0)
  image.set_shape([image_size, image_size, 3])
  return image


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Left-right flip with probability 1/2, decided by the stateless ``seed``."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
  """Training view: inception crop, flip, bicubic resize: float32 [S, S, 3] in [0, 255].

  ``seed`` is split with ``tf.random.experimental.stateless_split(seed, 2)``: the first
  half drives the crop (``inception_crop_window``), the second the flip. The flip happens
  before the resize, as in the references; with half-pixel centres the two commute anyway.
  """
  image_size = _check_image_size(image_size)
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = random_flip(inception_crop(image_bytes, crop_seed, image_size), flip_seed)
  return _resize_and_clip(image, image_size)


# ---------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------


def _check_image_size(image_size: Any) -> int:
  if (
    isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1
  ):
    raise ValueError(f'image_size must be an integer >= 1, got {image_size!r}.')
  return int(image_size)


def _check_eval_args(image_size: Any, method: Any, crop_pct: Any) -> tuple[int, str, float]:
  image_size = _check_image_size(image_size)
  if method not in EVAL_METHODS:
    raise ValueError(f'Unknown eval method {method!r}; valid methods: {", ".join(EVAL_METHODS)}.')
  if (
    isinstance(crop_pct, bool)
    or not isinstance(crop_pct, (int, float, np.floating))
    or not 0.0 < float(crop_pct) <= 1.0
  ):
    raise ValueError(f'crop_pct must be a number in (0, 1], got {crop_pct!r}.')
  return image_size, method, float(crop_pct)


def crop_pct_sizes(
  height: tf.Tensor, width: tf.Tensor, image_size: int, crop_pct: float
) -> tuple[tf.Tensor, tf.Tensor]:
  """The resized (H', W') of the 'crop_pct' method (int32 scalars), see the module doc."""
  scale_size = math.floor(image_size / crop_pct)
  height64, width64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  # float64 reproduces torchvision's Python int(size * long / short) exactly.
  longer_h = tf.cast(tf.floor(scale_size * height64 / width64), tf.int32)
  longer_w = tf.cast(tf.floor(scale_size * width64 / height64), tf.int32)
  new_height = tf.where(height <= width, scale_size, longer_h)
  new_width = tf.where(width <= height, scale_size, longer_w)
  return new_height, new_width


def eval_crop(
  image_bytes: tf.Tensor, image_size: int, method: str = 'resize_crop_32', crop_pct: float = 0.875
) -> tf.Tensor:
  """Evaluation view (graph-mode safe) before normalisation: float32 [S, S, 3] in about
  0..255 (bicubic overshoot is kept, as the released weights were evaluated).

  Args:
    image_bytes: encoded image, tf.string scalar.
    image_size: the test size S.
    method: one of ``EVAL_METHODS`` (see the module docstring).
    crop_pct: for 'crop_pct' only: the shorter side is resized to floor(S / crop_pct).
  """
  image_size, method, crop_pct = _check_eval_args(image_size, method, crop_pct)
  image = decode_rgb(image_bytes)
  if method == 'resize_crop_32':
    padded = image_size + CROP_PADDING
    image = resize_bicubic(image, padded, padded)
    offset = CROP_PADDING // 2
    image = image[offset : offset + image_size, offset : offset + image_size]
  elif method == 'crop_resize':
    image = _slice(image, centre_crop_window(tf.shape(image), image_size))
    image = resize_bicubic(image, image_size, image_size)
  else:
    shape = tf.shape(image)
    new_height, new_width = crop_pct_sizes(shape[0], shape[1], image_size, crop_pct)
    image = resize_bicubic(image, new_height, new_width)
    # tf.round rounds half to even, like Python's round() in torchvision's CenterCrop.
    top = tf.cast(tf.round((new_height - image_size) / 2), tf.int32)
    left = tf.cast(tf.round((new_width - image_size) / 2), tf.int32)
    image = tf.slice(image, [top, left, 0], [image_size, image_size, 3])
  image.set_shape([image_size, image_size, 3])
  return image


# TensorFlow's CPU kernels for broadcasting arithmetic ([S, S, 3] against [3]) take ~1 ms
# per 256 px image, 40% of the whole evaluation preprocessing; XLA fuses the two ops
# into one pass at a twentieth of that.
@tf.function(jit_compile=True)
def _normalize_float(image: tf.Tensor) -> tf.Tensor:
  return (image - tf.constant(MEAN_RGB, tf.float32)) / tf.constant(STDDEV_RGB, tf.float32)


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """RGB image in 0..255 (any float/int dtype) -> float32 normalised with ImageNet stats."""
  return _normalize_float(tf.cast(image, tf.float32))


def eval_preprocess(
  image_bytes: tf.Tensor, image_size: int, method: str = 'resize_crop_32', crop_pct: float = 0.875
) -> tf.Tensor:
  """``eval_crop`` normalised with the ImageNet mean/std: what the model sees."""
  return normalize_image(eval_crop(image_bytes, image_size, method, crop_pct))


@functools.lru_cache(maxsize=16)
def _eval_fn(image_size: int, method: str, crop_pct: float):
  return tf.function(
    lambda b: eval_preprocess(b, image_size, method, crop_pct),
    input_signature=[tf.TensorSpec([], tf.string)],
  )


def eval_image(
  encoded_image_bytes: bytes,
  image_size: int,
  method: str = 'resize_crop_32',
  crop_pct: float = 0.875,
) -> np.ndarray:
  """``eval_preprocess`` on encoded bytes, eagerly: float32 [S, S, 3] NumPy, normalised.

  Raises:
    TypeError: ``encoded_image_bytes`` is not bytes-like.
    ValueError: the bytes cannot be decoded (corrupt, truncated or unsupported format),
      or ``image_size``/``method``/``crop_pct`` are invalid.
  """
  image_size, method, crop_pct = _check_eval_args(image_size, method, crop_pct)
  if not isinstance(encoded_image_bytes, (bytes, bytearray, memoryview)):
    raise TypeError(
      'encoded_image_bytes must be the bytes of an encoded image, got '
      f'{type(encoded_image_bytes).__name__}.'
    )
  data = bytes(encoded_image_bytes)
  if not data:
    raise ValueError(f'{_UNDECODABLE}: empty input.')
  fileio.hide_gpus_from_tensorflow()
  try:
    image = _eval_fn(image_size, method, crop_pct)(tf.constant(data))
  except tf.errors.OpError as e:
    raise ValueError(_error_line(e)) from None
  return image.numpy()


# ---------------------------------------------------------------------------------------
# The per-example step of the sources of encoded images.
# ---------------------------------------------------------------------------------------


def decoded_image_preprocess(
  example: Mapping[str, tf.Tensor], data_config: ml_collections.ConfigDict, *, rng: tf.Tensor | None
) -> dict[str, tf.Tensor]:
  """Encoded image bytes + label -> the paper's per-image train or eval preprocessing.

  ``DataSource.preprocess`` of every source whose examples are {'image': encoded bytes,
  'label': int}: ``train_image`` at data_config.image_size when ``rng`` is given, else
  ``eval_crop`` with data_config.eval_preprocess at ``sources.eval_image_size``.
  """
  if rng is not None:
    image = train_image(example['image'], rng, int(data_config.image_size))
  else:
    image = eval_crop(
      example['image'],
      sources.eval_image_size(data_config),
      method=data_config.eval_preprocess,
      crop_pct=float(data_config.crop_pct),
    )
  return {'images': image, 'labels': tf.cast(example['label'], tf.int32)}
