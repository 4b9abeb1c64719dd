"""Image preprocessing against independent references: PIL for decoding, a NumPy
re-implementation of TF's non-antialiased bicubic for resizing, and the crop geometry
recomputed here from its definition.

A few views that only the tests need are built here from the library's ops: the fused
JPEG crop of any window, the unflipped inception crop, and an eager decodability check
(also as a ``tf.py_function`` for ``ds.filter``)."""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from nfnet_jax import fileio
from nfnet_jax.data import preprocess

fileio.hide_gpus_from_tensorflow()

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
# Resize outputs vs the NumPy reference, in 0..255 units: float32 accumulation order in
# TF's kernel (measured max ~1e-4).
RESIZE_ATOL = 2e-3


# ---------------------------------------------------------------------------------------
# Independent references.
# ---------------------------------------------------------------------------------------


def _keys_cubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(
    x <= 1,
    ((a + 2) * x - (a + 3)) * x * x + 1,
    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
  )


def _bicubic_matrix(in_size, out_size):
  """[out_size, in_size] interpolation matrix of TF's ResizeBicubic with half-pixel
  centres (written from its definition, not from TF's code):
    * sample position s = (o + 0.5) * (in / out) - 0.5, computed in float32;
    * taps floor(s) - 1 .. floor(s) + 2 with Keys' cubic (a = -0.5) of the distance; TF
      reads the weights from a 1024-entry table, i.e. the fraction is rounded to 1/1024;
    * taps outside [0, in) get weight 0 and the rest are renormalised to sum to 1 (no
      edge replication, unlike the legacy half_pixel_centers=False kernel)."""
  scale = np.float32(in_size) / np.float32(out_size)
  pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.floor(pos)
  frac = np.rint((pos - base).astype(np.float64) * 1024) / 1024
  matrix = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  for k in (-1, 0, 1, 2):
    idx = base.astype(np.int64) + k
    inside = (idx >= 0) & (idx < in_size)
    matrix[rows[inside], idx[inside]] += _keys_cubic(frac - k)[inside]
  return matrix / matrix.sum(1, keepdims=True)


def _resize_ref(image, height, width):
  image = np.asarray(image, np.float64)
  return np.einsum(
    'oh,hwc,pw->opc',
    _bicubic_matrix(image.shape[0], height),
    image,
    _bicubic_matrix(image.shape[1], width),
  )


def _max_gain(in_h, in_w, out_h, out_w):
  """Largest output change per unit input change (sum of |weights|), for bounding how a
  +-1 decoder difference propagates through the resize."""
  gain = lambda i, o: np.abs(_bicubic_matrix(i, o)).sum(1).max()
  return gain(in_h, out_h) * gain(in_w, out_w)


def _encode(array_or_image, fmt, **kwargs):
  image = array_or_image
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _pil_rgb(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def _test_image(height, width, seed=0):
  """Smooth colour patterns plus noise: strong high-frequency chroma (which exposes
  JPEG upsampling differences) and values near 0 and 255 (bicubic overshoot)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack(
    [128 + 120 * np.sin(x / 3.0 + y / 7.0), 128 + 120 * np.cos(x / 2.0), (x * 7 + y * 3) % 256], -1
  )
  return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def _png16(array):
  """A 16-bit PNG (gray [H, W] or RGB [H, W, 3], uint16), written by hand: PIL cannot
  write 16-bit RGB."""
  height, width = array.shape[:2]
  color_type = 0 if array.ndim == 2 else 2
  raw = b''.join(b'\0' + row.astype('>u2').tobytes() for row in array)

  def chunk(tag, payload):
    return (
      struct.pack('>I', len(payload))
      + tag
      + payload
      + struct.pack('>I', zlib.crc32(tag + payload) & 0xFFFFFFFF)
    )

  header = struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(raw))
    + chunk(b'IEND', b'')
  )


def _denormalise(image):
  return np.asarray(image, np.float64) * STD + MEAN


def _seed(s):
  return tf.constant([s, 2024], tf.int64)


# ---------------------------------------------------------------------------------------
# Views built from the library's ops.
# ---------------------------------------------------------------------------------------


def decode_crop(image_bytes, window):
  """The window [offset_y, offset_x, height, width] of the decoded image (uint8 [h, w, 3]),
  through the path training takes: the fused, margin-corrected ``decode_and_crop_jpeg``
  for JPEGs, a full decode and slice for other formats."""
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)

  def jpeg():
    checked = preprocess._check_complete_jpeg(image_bytes)
    return preprocess._decode_and_crop_jpeg(
      checked, window, tf.image.extract_jpeg_shape(checked)[1]
    )

  crop = tf.cond(
    tf.io.is_jpeg(image_bytes),
    jpeg,
    lambda: preprocess._slice(preprocess._decode_other(image_bytes), window),
  )
  crop.set_shape([None, None, 3])
  return crop


def decode_and_inception_crop(image_bytes, seed, image_size):
  """``train_image`` without the flip: the inception crop, bicubic-resized and clipped to
  [0, 255] (float32 [S, S, 3])."""
  image = preprocess.inception_crop(tf.convert_to_tensor(image_bytes, tf.string), seed, image_size)
  image = tf.clip_by_value(preprocess.resize_bicubic(image, image_size, image_size), 0.0, 255.0)
  image.set_shape([image_size, image_size, 3])
  return image


@functools.lru_cache(maxsize=None)
def _decode_rgb_fn():
  return tf.function(preprocess.decode_rgb, input_signature=[tf.TensorSpec([], tf.string)])


def check_image_bytes(data):
  """Decodes ``data`` eagerly as the pipeline would: None if that works, else the one-line
  reason (starting with "Cannot decode image") that ``eval_image`` would raise."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    return f'Cannot decode image: expected encoded bytes, got {type(data).__name__}.'
  data = bytes(data)
  if not data:
    return f'{preprocess._UNDECODABLE}: empty input.'
  try:
    _decode_rgb_fn()(tf.constant(data))
  except tf.errors.OpError as e:
    return preprocess._error_line(e)
  return None


def is_decodable(image_bytes):
  """tf.bool scalar: whether ``check_image_bytes`` accepts the bytes, for ``ds.filter``
  (a ``tf.py_function``)."""

  def check(b):
    return check_image_bytes(b.numpy()) is None

  ok = tf.py_function(check, [image_bytes], tf.bool)
  ok.set_shape([])
  return ok


# ---------------------------------------------------------------------------------------
# Evaluation resizes.
# ---------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
  height=st.integers(8, 64),
  width=st.integers(8, 64),
  size=st.integers(4, 40),
  seed=st.integers(0, 1000),
)
def test_resize_crop_32_png_matches_numpy_bicubic(height, width, size, seed):
  array = _test_image(height, width, seed)
  out = preprocess.eval_image(_encode(array, 'PNG'), size)
  assert out.dtype == np.float32 and out.shape == (size, size, 3)
  ref = _resize_ref(array, size + 32, size + 32)[16 : 16 + size, 16 : 16 + size]
  # Normalisation with the literal ImageNet constants, and no clipping of the overshoot.
  np.testing.assert_allclose(out, (ref - MEAN) / STD, atol=RESIZE_ATOL / STD.min(), rtol=0)
  np.testing.assert_allclose(_denormalise(out), ref, atol=RESIZE_ATOL, rtol=0)


def test_resize_crop_32_keeps_overshoot_and_differs_from_pil_antialiasing():
  size = 32
  array = _test_image(150, 130, seed=1)  # A 2x+ downscale to 64 x 64.
  out = _denormalise(preprocess.eval_image(_encode(array, 'PNG'), size))
  ref = _resize_ref(array, size + 32, size + 32)[16 : 16 + size, 16 : 16 + size]
  ours = np.abs(out - ref).max()
  assert ours < RESIZE_ATOL
  assert out.min() < 0 or out.max() > 255  # Overshoot is not clipped at eval.
  pil = np.asarray(
    Image.fromarray(array).resize((size + 32, size + 32), Image.BICUBIC), np.float64
  )[16 : 16 + size, 16 : 16 + size]
  pil_diff = np.abs(out - pil)
  # PIL antialiases (widens the kernel when downscaling): far from TF's pixels.
  assert pil_diff.mean() > 5.0 and pil_diff.max() > 1000 * ours


def test_resize_crop_32_jpeg_matches_pil_decode_plus_numpy_bicubic():
  size = 40
  array = _test_image(97, 131, seed=2)
  data = _encode(array, 'JPEG', quality=90)  # 4:2:0 chroma subsampling.
  decoded = _pil_rgb(data)
  # TF decodes with libjpeg's accurate IDCT (JPEG_DCT_METHOD): PIL's decode matches
  # exactly (measured max 0); allow +-1 for other libjpeg(-turbo) builds.
  decode_diff = np.abs(preprocess.decode_rgb(data).numpy().astype(int) - decoded).max()
  assert decode_diff <= 1
  out = _denormalise(preprocess.eval_image(data, size))
  ref = _resize_ref(decoded, size + 32, size + 32)[16 : 16 + size, 16 : 16 + size]
  bound = decode_diff * _max_gain(97, 131, size + 32, size + 32) + RESIZE_ATOL
  assert np.abs(out - ref).max() <= bound


def test_tf_default_jpeg_idct_differs_from_pil():
  # Why JPEG_DCT_METHOD is set: TF's default IDCT (INTEGER_FAST) is not PIL's.
  data = _encode(_test_image(64, 64, seed=3), 'JPEG', quality=95)
  fast = tf.io.decode_jpeg(data, channels=3).numpy().astype(int)
  assert np.abs(fast - _pil_rgb(data)).max() > 1


@pytest.mark.parametrize(
  'height,width,size,crop_pct',
  [
    (50, 77, 24, 0.875),  # landscape; offsets round(1.5) = 2 and round(8.5) = 8
    (90, 61, 32, 0.9),  # portrait; round(9.5) = 10, round(1.5) = 2
    (40, 40, 16, 1.0),  # square, no margin
    (33, 120, 20, 0.5),  # heavy downscale of the long side
  ],
)
def test_crop_pct_matches_torchvision_geometry_and_numpy_bicubic(height, width, size, crop_pct):
  array = _test_image(height, width, seed=4)
  out = preprocess.eval_image(_encode(array, 'PNG'), size, method='crop_pct', crop_pct=crop_pct)
  assert out.shape == (size, size, 3)
  # timm: scale_size = floor(S / crop_pct); torchvision Resize(int): shorter side to
  # scale_size, longer to int(scale_size * long / short); CenterCrop: round((H' - S) / 2).
  scale = math.floor(size / crop_pct)
  if height <= width:
    new_h, new_w = scale, int(scale * width / height)
  else:
    new_h, new_w = int(scale * height / width), scale
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  ref = _resize_ref(array, new_h, new_w)[top : top + size, left : left + size]
  np.testing.assert_allclose(_denormalise(out), ref, atol=RESIZE_ATOL, rtol=0)


@pytest.mark.parametrize(
  'height,width,size',
  [
    (50, 77, 24),  # landscape: side floor(50 * 24 / 56) = 21, offsets (15, 28)
    (90, 61, 32),  # portrait: side floor(61 * 32 / 64) = 30, offsets (30, 16)
    (40, 40, 16),  # square: side 13, offset (40 - 13 + 1) // 2 = 14
    (20, 300, 8),  # tiny side: floor(20 * 8 / 40) = 4, upscaled 2x
  ],
)
def test_crop_resize_matches_centre_square_and_numpy_bicubic(height, width, size):
  array = _test_image(height, width, seed=5)
  out = preprocess.eval_image(_encode(array, 'PNG'), size, method='crop_resize')
  assert out.shape == (size, size, 3)
  # DeepMind's `crop_resize`: a centred square of side min(H, W) * S / (S + 32), offset
  # ((H - side + 1) // 2, (W - side + 1) // 2), then bicubic to S x S.
  side = int(min(height, width) * size / (size + 32))
  top, left = (height - side + 1) // 2, (width - side + 1) // 2
  ref = _resize_ref(array[top : top + side, left : left + side], size, size)
  np.testing.assert_allclose(_denormalise(out), ref, atol=RESIZE_ATOL, rtol=0)
  # Not the NFNet view (squash to S + 32, crop S): a different picture.
  other = preprocess.eval_image(_encode(array, 'PNG'), size)
  assert np.abs(out - other).max() > 0.1


def test_eval_preprocess_in_tf_data_matches_eval_image():
  images = [
    _encode(_test_image(30 + 7 * i, 45 - 5 * i, seed=i), fmt)
    for i, fmt in enumerate(['PNG', 'JPEG', 'PNG'])
  ]
  for method in preprocess.EVAL_METHODS:
    fn = functools.partial(preprocess.eval_preprocess, image_size=24, method=method)
    ds = tf.data.Dataset.from_tensor_slices(images).map(
      fn, num_parallel_calls=2, deterministic=True
    )
    assert ds.element_spec.shape == (24, 24, 3)
    for data, out in zip(images, ds.as_numpy_iterator(), strict=True):
      np.testing.assert_allclose(out, preprocess.eval_image(data, 24, method=method), atol=1e-6)


def test_eval_image_errors_are_clear():
  good = _encode(_test_image(20, 20), 'PNG')
  jpeg = _encode(_test_image(40, 40), 'JPEG')
  for bad in [b'not an image at all', b'', jpeg[: len(jpeg) // 2], good[:-20]]:
    with pytest.raises(ValueError, match='corrupt or not a supported format'):
      preprocess.eval_image(bad, 16)
  with pytest.raises(ValueError, match='truncated JPEG'):
    preprocess.eval_image(jpeg[:-30], 16)
  with pytest.raises(ValueError, match='resize_crop_32, crop_resize, crop_pct') as info:
    preprocess.eval_image(good, 16, method='center_crop')
  assert "'center_crop'" in str(info.value)
  for size in [0, -3, 2.5, True, '224']:
    with pytest.raises(ValueError, match='image_size must be an integer >= 1'):
      preprocess.eval_image(good, size)
  for pct in [0.0, 1.5, float('nan'), -0.5]:
    with pytest.raises(ValueError, match=r'crop_pct must be a number in \(0, 1\]'):
      preprocess.eval_image(good, 16, method='crop_pct', crop_pct=pct)
  with pytest.raises(TypeError, match='bytes'):
    preprocess.eval_image('/path/to/image.jpg', 16)


# ---------------------------------------------------------------------------------------
# Training crop and flip.
# ---------------------------------------------------------------------------------------


def _centre_window(height, width, size):
  side = max(int(min(height, width) * size / (size + 32)), 1)
  return [((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side]


@pytest.mark.parametrize('height,width', [(48, 64), (64, 48), (100, 100), (30, 90)])
def test_inception_crop_window_in_range_or_centre_fallback(height, width):
  size = 32
  centre = _centre_window(height, width, size)
  windows = np.stack(
    [
      preprocess.inception_crop_window([height, width, 3], _seed(s), size).numpy()
      for s in range(40)
    ]
  )
  assert windows.dtype == np.int32
  sampled = 0
  for y, x, h, w in windows:
    assert 0 <= y and 0 <= x and 1 <= h and 1 <= w and y + h <= height and x + w <= width
    if [y, x, h, w] == centre:
      continue
    sampled += 1
    # Area: 8-100%, and >= 10% through min_object_covered with the whole image as object.
    assert 0.1 <= h * w / (height * width) < 1.0
    # Aspect 3/4..4/3; the sampler rounds width = lrint(height * ratio): +-0.5 px.
    assert 0.75 * h - 0.5 <= w <= 4 / 3 * h + 0.5
  assert sampled >= 30
  assert len({tuple(w) for w in windows}) > 20


def test_inception_crop_falls_back_to_centre_crop_on_thin_images():
  # No window of aspect 3/4..4/3 covers 10% of a 10 x 200 image: the sampler returns the
  # whole image, which means "failed" and becomes the centre crop.
  size = 32
  array = _test_image(10, 200, seed=5)
  y, x, h, w = _centre_window(10, 200, size)
  assert (y, x, h, w) == (3, 98, 5, 5)
  for fmt in ['PNG', 'JPEG']:
    data = _encode(array, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
    decoded = preprocess.decode_rgb(data).numpy()
    for s in range(3):
      window = preprocess.inception_crop_window([10, 200], _seed(s), size).numpy()
      assert window.tolist() == [y, x, h, w]
      out = decode_and_inception_crop(data, _seed(s), size).numpy()
      ref = np.clip(_resize_ref(decoded[y : y + h, x : x + w], size, size), 0, 255)
      np.testing.assert_allclose(out, ref, atol=RESIZE_ATOL, rtol=0)


def test_fused_jpeg_crop_equals_full_decode_then_crop():
  # 4:2:0 and 4:2:2 with strong chroma detail. Raw decode_and_crop_jpeg changes the
  # window's edge columns by tens of levels when the window starts or ends on an MCU
  # boundary; decode_crop must equal the full decode exactly.
  array = _test_image(75, 133, seed=6)
  rng = np.random.default_rng(0)
  for subsampling in ['4:2:0', '4:2:2', '4:4:4']:
    data = _encode(array, 'JPEG', quality=90, subsampling=subsampling)
    full = preprocess.decode_rgb(data).numpy()
    windows = [preprocess.inception_crop_window([75, 133], _seed(s), 24).numpy() for s in range(8)]
    windows += [[16, 16, 32, 48], [0, 32, 75, 64], [8, 0, 40, 16], [3, 117, 60, 16]]
    for _ in range(8):
      h, w = rng.integers(1, 76), rng.integers(1, 134)
      y, x = rng.integers(0, 76 - h), rng.integers(0, 134 - w)
      windows.append([y, x, h, w])
    for y, x, h, w in windows:
      crop = decode_crop(data, tf.constant([y, x, h, w])).numpy()
      np.testing.assert_array_equal(crop, full[y : y + h, x : x + w])


def test_raw_fused_crop_edge_artefact_exists():
  # The artefact decode_crop works around (keeps the test above meaningful).
  data = _encode(_test_image(75, 133, seed=6), 'JPEG', quality=90, subsampling='4:2:0')
  full = preprocess.decode_rgb(data).numpy().astype(int)
  raw = tf.image.decode_and_crop_jpeg(
    data, [16, 16, 32, 48], channels=3, dct_method=preprocess.JPEG_DCT_METHOD
  ).numpy()
  assert np.abs(raw.astype(int) - full[16:48, 16:64]).max() > 10


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_decode_and_inception_crop_matches_reference(fmt):
  size = 24
  array = _test_image(60, 80, seed=7)
  data = _encode(array, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
  decoded = preprocess.decode_rgb(data).numpy()
  if fmt == 'PNG':
    np.testing.assert_array_equal(decoded, array)
  for s in range(4):
    y, x, h, w = preprocess.inception_crop_window([60, 80], _seed(s), size).numpy()
    out = decode_and_inception_crop(data, _seed(s), size)
    assert out.dtype == tf.float32 and out.shape == (size, size, 3)
    out = out.numpy()
    assert out.min() >= 0 and out.max() <= 255
    ref = np.clip(_resize_ref(decoded[y : y + h, x : x + w], size, size), 0, 255)
    np.testing.assert_allclose(out, ref, atol=RESIZE_ATOL, rtol=0)


def test_random_flip_is_fliplr_or_identity():
  image = tf.constant(_test_image(5, 7))
  outcomes = []
  for s in range(16):
    out = preprocess.random_flip(image, _seed(s)).numpy()
    flipped = np.array_equal(out, np.fliplr(image.numpy()))
    assert flipped or np.array_equal(out, image.numpy())
    outcomes.append(flipped)
  assert any(outcomes) and not all(outcomes)


def test_train_image_is_flipped_inception_crop_and_deterministic():
  size = 32
  data = _encode(_test_image(90, 120, seed=8), 'JPEG', quality=90)
  outputs = []
  for s in range(6):
    out = preprocess.train_image(data, _seed(s), size)
    assert out.dtype == tf.float32 and out.shape == (size, size, 3)
    out = out.numpy()
    assert out.min() >= 0 and out.max() <= 255
    crop_seed = tf.random.experimental.stateless_split(_seed(s), 2)[0]
    unflipped = decode_and_inception_crop(data, crop_seed, size).numpy()
    # Flip-then-resize equals resize-then-flip (half-pixel centres are symmetric).
    assert np.allclose(out, unflipped, atol=1e-3) or np.allclose(out, unflipped[:, ::-1], atol=1e-3)
    np.testing.assert_array_equal(out, preprocess.train_image(data, _seed(s), size).numpy())
    outputs.append(out)
  assert all(not np.array_equal(outputs[0], o) for o in outputs[1:])


def test_train_image_in_parallel_tf_data_map_is_deterministic():
  size = 16
  images = [
    _encode(_test_image(40 + 9 * i, 50, seed=i), fmt)
    for i, fmt in enumerate(['JPEG', 'PNG', 'JPEG', 'GIF', 'BMP', 'JPEG'])
  ]

  def run():
    ds = (
      tf.data.Dataset.from_tensor_slices(images)
      .enumerate()
      .map(
        lambda i, b: preprocess.train_image(
          b, tf.random.experimental.stateless_fold_in(_seed(0), i), size
        ),
        num_parallel_calls=4,
        deterministic=True,
      )
    )
    return np.stack(list(ds.as_numpy_iterator()))

  first = run()
  assert first.shape == (6, size, size, 3)
  np.testing.assert_array_equal(first, run())
  for i, data in enumerate(images):
    seed = tf.random.experimental.stateless_fold_in(_seed(0), tf.constant(i, tf.int64))
    np.testing.assert_array_equal(first[i], preprocess.train_image(data, seed, size).numpy())


# ---------------------------------------------------------------------------------------
# Decoding and bad data.
# ---------------------------------------------------------------------------------------


def test_decode_grayscale_jpeg_gives_three_equal_channels():
  gray = _test_image(30, 40)[..., 0]
  data = _encode(gray, 'JPEG', quality=90)
  out = preprocess.decode_rgb(data).numpy()
  assert out.shape == (30, 40, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert np.abs(out[..., 0].astype(int) - np.asarray(Image.open(io.BytesIO(data)))).max() <= 1
  # The fused path handles one-channel JPEGs too.
  np.testing.assert_array_equal(decode_crop(data, [3, 5, 20, 30]).numpy(), out[3:23, 5:35])


def test_decode_cmyk_jpeg_matches_pil_conversion():
  rng = np.random.default_rng(9)
  y, x = np.mgrid[0:40, 0:56]
  cmyk = np.stack([x * 4, y * 6, (x + y) * 2, 255 - (x * y) % 256], -1)
  cmyk = np.clip(cmyk + rng.integers(-20, 20, cmyk.shape), 0, 255).astype(np.uint8)
  data = _encode(Image.fromarray(cmyk, 'CMYK'), 'JPEG', quality=95)
  assert Image.open(io.BytesIO(data)).mode == 'CMYK'
  out = preprocess.decode_rgb(data).numpy()
  assert out.shape == (40, 56, 3)
  # TF truncates C * K / 255, PIL rounds: at most 1 apart (measured max 1).
  assert np.abs(out.astype(int) - _pil_rgb(data)).max() <= 1
  np.testing.assert_array_equal(decode_crop(data, [3, 5, 20, 30]).numpy(), out[3:23, 5:35])


def test_decode_png_variants():
  rgb = _test_image(20, 30)
  rng = np.random.default_rng(10)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)], -1)
  np.testing.assert_array_equal(preprocess.decode_rgb(_encode(rgba, 'PNG')).numpy(), rgb)
  gray_alpha = Image.fromarray(rgba[..., 1:3].copy(), 'LA')
  np.testing.assert_array_equal(
    preprocess.decode_rgb(_encode(gray_alpha, 'PNG')).numpy(), np.repeat(rgba[..., 1:2], 3, -1)
  )
  palette = Image.fromarray(rgb).quantize(32)
  data = _encode(palette, 'PNG')
  np.testing.assert_array_equal(preprocess.decode_rgb(data).numpy(), _pil_rgb(data))
  # 16-bit: the high byte (v >> 8), for gray and RGB.
  for shape in [(12, 17), (12, 17, 3)]:
    deep = rng.integers(0, 65536, shape, dtype=np.uint16)
    out = preprocess.decode_rgb(_png16(deep)).numpy()
    expected = (deep // 256).astype(np.uint8)
    if deep.ndim == 2:
      expected = np.repeat(expected[..., None], 3, -1)
    np.testing.assert_array_equal(out, expected)


def test_decode_gif_bmp_webp():
  rgb = _test_image(20, 30)
  frames = [Image.fromarray(rgb).quantize(64), Image.fromarray(255 - rgb).quantize(64)]
  buf = io.BytesIO()
  frames[0].save(buf, 'GIF', save_all=True, append_images=frames[1:])
  gif = buf.getvalue()
  assert preprocess.image_format(gif).numpy() == b'gif'
  np.testing.assert_array_equal(preprocess.decode_rgb(gif).numpy(), _pil_rgb(gif))  # frame 0
  for fmt, kwargs in [('BMP', {}), ('WEBP', {'lossless': True})]:
    data = _encode(rgb, fmt, **kwargs)
    assert preprocess.image_format(data).numpy() == fmt.lower().encode()
    np.testing.assert_array_equal(preprocess.decode_rgb(data).numpy(), rgb)


def _bad_inputs():
  jpeg = _encode(_test_image(64, 48), 'JPEG', quality=90)
  png = _encode(_test_image(64, 48), 'PNG')
  return (
    {
      'garbage': b'definitely not an image',
      'empty': b'',
      'jpeg header only': jpeg[:300],
      'truncated jpeg': jpeg[:-200],
      'jpeg without EOI': jpeg[:-2],
      'truncated png': png[: len(png) // 2],
      'png without IEND': png[:-12],
    },
    jpeg,
    png,
  )


def test_check_image_bytes_reports_bad_data():
  bad, jpeg, png = _bad_inputs()
  assert check_image_bytes(jpeg) is None
  assert check_image_bytes(png) is None
  for name, data in bad.items():
    message = check_image_bytes(data)
    assert message is not None and message.startswith('Cannot decode image'), name
    assert '\n' not in message
  assert 'truncated JPEG' in check_image_bytes(bad['truncated jpeg'])
  assert 'unrecognised' in check_image_bytes(bad['garbage'])


def test_bad_data_in_tf_data_is_flagged_not_a_crash():
  bad, jpeg, png = _bad_inputs()
  items = [jpeg] + list(bad.values()) + [png]
  ds = tf.data.Dataset.from_tensor_slices(items)
  flags = list(ds.map(is_decodable).as_numpy_iterator())
  assert flags == [True] + [False] * len(bad) + [True]
  good = (
    ds.filter(is_decodable)
    .enumerate()
    .map(
      lambda i, b: preprocess.train_image(
        b, tf.random.experimental.stateless_fold_in(_seed(1), i), 16
      ),
      num_parallel_calls=2,
    )
  )
  assert len(list(good.as_numpy_iterator())) == 2
  # Unfiltered, each bad element raises a catchable, explicit error from the iterator.
  for data in bad.values():
    it = (
      tf.data.Dataset.from_tensors(data)
      .map(lambda b: preprocess.eval_preprocess(b, 16))
      .as_numpy_iterator()
    )
    with pytest.raises(tf.errors.InvalidArgumentError):
      next(it)


def test_truncated_jpeg_fails_consistently_in_fused_crop():
  # TF's fused decode succeeds on a truncated JPEG when the window lies in the rows before
  # the cut, and fails otherwise; ours always reports it.
  jpeg = _encode(_test_image(64, 48), 'JPEG', quality=90)
  truncated = jpeg[:-200]
  tf.image.decode_and_crop_jpeg(truncated, [0, 0, 8, 8], channels=3)  # "Works".
  with pytest.raises(tf.errors.InvalidArgumentError, match='truncated JPEG'):
    decode_crop(truncated, [0, 0, 8, 8])
  with pytest.raises(tf.errors.InvalidArgumentError, match='truncated JPEG'):
    preprocess.train_image(truncated, _seed(0), 16)


def test_image_format():
  _, jpeg, png = _bad_inputs()
  assert preprocess.image_format(jpeg).numpy() == b'jpeg'
  assert preprocess.image_format(png).numpy() == b'png'
  for data in [b'', b'B', b'RIFF', b'RIFF\0\0\0\0WEBX', b'GIF88a']:
    assert preprocess.image_format(data).numpy() == b'unknown'
