"""RandAugment (nfnet_jax.data.augment.randaugment): the magnitude mapping, the random
choices, and the batched path against the per-image reference, bit for bit.

The per-image reference (tests/data/randaugment_reference.py) applies one op at a time
with the same draws; its ops are checked against Pillow in test_augment_ops.py.
"""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow as tf

from nfnet_jax.data.augment import ops
from nfnet_jax.data.augment import randaugment as ra
from tests.data import randaugment_reference as ref
from tests.data.helpers import HYPOTHESIS_SETTINGS, SMALL_IMAGES, cutout_centres, random_image

# ---------------------------------------------------------------- mapping


def test_op_names():
  assert ra.NUM_OPS == 16 == len(ra.OP_NAMES) == len(set(ra.OP_NAMES))
  # The order is part of the API: op indices are drawn against it.
  assert ra.OP_NAMES == (
    'AutoContrast',
    'Equalize',
    'Invert',
    'Rotate',
    'Posterize',
    'Solarize',
    'Color',
    'Contrast',
    'Brightness',
    'Sharpness',
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
    'Cutout',
    'SolarizeAdd',
  )
  assert ra.SIGNED_OPS == {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'}


@pytest.mark.parametrize(
  'm, want',
  [
    (
      10,
      dict(
        Rotate=30,
        Posterize=4,
        Solarize=256,
        Color=1.9,
        ShearX=0.3,
        TranslateX=100,
        Cutout=40,
        SolarizeAdd=110,
      ),
    ),
    (
      15,
      dict(
        Rotate=45,
        Posterize=6,
        Solarize=384,
        Color=2.8,
        ShearX=0.45,
        TranslateX=150,
        Cutout=60,
        SolarizeAdd=165,
      ),
    ),
    (
      5,
      dict(
        Rotate=15,
        Posterize=2,
        Solarize=128,
        Color=1.0,
        ShearX=0.15,
        TranslateX=50,
        Cutout=20,
        SolarizeAdd=55,
      ),
    ),
    (
      2,
      dict(
        Rotate=6,
        Posterize=0,
        Solarize=51,
        Color=0.46,
        ShearX=0.06,
        TranslateX=20,
        Cutout=8,
        SolarizeAdd=22,
      ),
    ),
    (25, dict(Posterize=8)),  # int(10) bits, clipped to 8.
  ],
)
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


# ---------------------------------------------------------------- properties


@HYPOTHESIS_SETTINGS
@hypothesis.given(SMALL_IMAGES, st.floats(0, 20), st.integers(0, 2**31 - 1))
def test_randaugment_deterministic_and_valid(x, magnitude, seed):
  seed = tf.constant([seed, 17], tf.int64)
  a = ref.randaugment(x, seed, num_layers=2, magnitude=magnitude).numpy()
  b = ref.randaugment(x, seed, num_layers=2, magnitude=magnitude).numpy()
  assert a.dtype == np.uint8 and a.shape == x.shape
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ref.randaugment(x, seed, num_layers=0, magnitude=magnitude), x)


def test_randaugment_seeds_differ():
  # Large enough, at a low enough magnitude, that translations and cutouts do not
  # grey out the whole image (which would make different op choices collide).
  x = random_image(64, 64)
  outputs = {
    ref.randaugment(x, tf.constant([i, 0]), num_layers=4, magnitude=5).numpy().tobytes()
    for i in range(12)
  }
  assert len(outputs) >= 11


def test_op_choice_is_uniform_and_per_layer(monkeypatch):
  chosen = []

  def record(image, op_index, magnitude, seed):
    del magnitude, seed
    chosen.append(int(op_index))
    return image

  monkeypatch.setattr(ref, 'apply_op', record)
  x = random_image(4, 4)
  for i in range(400):
    ref.randaugment(x, tf.constant([i, 5]), num_layers=4, magnitude=10)
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
  x = random_image(80, 80) // 2 + 60
  m = 7
  name = ra.OP_NAMES[op_index]
  args = ra.op_arguments(m)
  signs = set()
  for i in range(8):
    got = ref.apply_op(x, tf.constant(op_index), m, tf.constant([i, 3])).numpy()
    assert not np.array_equal(got, x), name
    if name == 'Cutout':
      assert cutout_centres(got, x, args['Cutout']), 'not a cutout'
      continue
    op = {'AutoContrast': ref.auto_contrast, 'Equalize': ref.equalize, 'Invert': ref.invert}.get(
      name
    )
    if op is not None:
      np.testing.assert_array_equal(got, op(x).numpy())
      continue
    op = getattr(
      ref,
      {
        'ShearX': 'shear_x',
        'ShearY': 'shear_y',
        'TranslateX': 'translate_x',
        'TranslateY': 'translate_y',
        'SolarizeAdd': 'solarize_add',
      }.get(name, name.lower()),
    )
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
  images = np.stack([random_image(24, 24, seed=i) for i in range(16)])
  base_seed = tf.constant([11, 22], tf.int64)

  def augment(index, image):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return ref.randaugment(image, seed, num_layers=4, magnitude=15)

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
  assert sum(not np.array_equal(a, b) for a, b in zip(eager, images, strict=True)) >= 14


def test_in_tf_data_map_dynamic_shapes():
  sizes = [(9, 13), (20, 7), (16, 16)]

  def gen():
    for i, size in enumerate(sizes):
      yield np.array([i, 0], np.int32), random_image(*size, seed=i)

  ds = tf.data.Dataset.from_generator(
    gen, output_signature=(tf.TensorSpec([2], tf.int32), tf.TensorSpec([None, None, 3], tf.uint8))
  )
  ds = ds.map(
    lambda seed, image: ref.randaugment(image, seed, num_layers=3, magnitude=12),
    num_parallel_calls=2,
  )
  outputs = list(ds.as_numpy_iterator())
  for i, (size, out) in enumerate(zip(sizes, outputs, strict=True)):
    assert out.shape == size + (3,) and out.dtype == np.uint8
    want = ref.randaugment(
      random_image(*size, seed=i), tf.constant([i, 0]), num_layers=3, magnitude=12
    )
    np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
  'image, match',
  [
    (np.zeros((8, 8, 3), np.float32), 'uint8'),
    (np.zeros((2, 8, 8, 3), np.uint8), r'\[H, W, 3\]'),
    (np.zeros((8, 8), np.uint8), r'\[H, W, 3\]'),
    (np.zeros((8, 8, 1), np.uint8), r'\[H, W, 3\]'),
    (np.zeros((8, 8, 4), np.uint8), r'\[H, W, 3\]'),
  ],
)
def test_bad_images(image, match):
  with pytest.raises(ValueError, match=match):
    ref.randaugment(image, [1, 2], num_layers=2, magnitude=10)
  with pytest.raises(ValueError, match=match):
    ref.invert(image)
  with pytest.raises(ValueError, match=match):
    ref.apply_op(image, 0, 10, [1, 2])


def test_bad_arguments():
  x = random_image(8, 8)
  with pytest.raises(ValueError, match='num_layers'):
    ref.randaugment(x, [1, 2], num_layers=-1, magnitude=10)
  with pytest.raises(ValueError, match='num_layers'):
    ref.randaugment(x, [1, 2], num_layers=2.0, magnitude=10)
  with pytest.raises(ValueError, match='magnitude'):
    ref.randaugment(x, [1, 2], num_layers=2, magnitude=-1)
  with pytest.raises(ValueError, match='magnitude'):
    ref.randaugment(x, [1, 2], num_layers=2, magnitude=float('nan'))
  with pytest.raises(ValueError, match='magnitude'):
    ra.op_arguments(-0.5)
  with pytest.raises(ValueError, match='seed'):
    ref.randaugment(x, [1, 2, 3], num_layers=2, magnitude=10)
  with pytest.raises(ValueError, match='seed'):
    ref.randaugment(x, [1.0, 2.0], num_layers=2, magnitude=10)
  with pytest.raises(ValueError, match='unknown'):

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8)])
    def unknown_rank(image):
      return ref.randaugment(image, [1, 2], num_layers=1, magnitude=10)

    unknown_rank(x)


# ---------------------------------------------------------------- randaugment_batch
#
# The batched version must equal the per-image one bit for bit: these tests compare the
# two directly (the per-image ops are checked against Pillow in test_augment_ops.py).

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
  return np.stack(
    [
      ref.randaugment(image, seed, num_layers=num_layers, magnitude=magnitude).numpy()
      for image, seed in zip(images, seeds, strict=True)
    ]
  )


@pytest.mark.parametrize('magnitude', _BATCH_MAGNITUDES)
def test_randaugment_batch_equals_per_image(magnitude):
  images = _batch((17, 23), 8, seed=3)
  seeds = np.random.default_rng(4).integers(-(2**62), 2**62, (8, 2))
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
  dtype=st.sampled_from([np.int32, np.int64]),
)
def test_randaugment_batch_equals_per_image_property(
  seed, magnitude, num_layers, batch_size, size, dtype
):
  images = _batch(size, batch_size, seed=seed)
  info = np.iinfo(dtype)
  seeds = np.random.default_rng(seed).integers(info.min, info.max, (batch_size, 2), dtype=dtype)
  got = ra.randaugment_batch(images, seeds, num_layers=num_layers, magnitude=magnitude)
  np.testing.assert_array_equal(got.numpy(), _per_image(images, seeds, num_layers, magnitude))


def _op_seeds_and_draws(count, height, width, seed):
  seeds = tf.constant(np.random.default_rng(seed).integers(-(2**62), 2**62, (count, 2)))
  draws = tf.stack(
    [
      tf.stack([tf.cast(v, tf.int32) for v in ra.op_draws(s, height, width)])
      for s in tf.unstack(seeds)
    ]
  )
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
  got = ref.apply_layer_batch(tf.constant(images), tf.fill([6], op_index), draws, magnitude).numpy()
  want = np.stack(
    [
      ref.apply_op(image, op_index, magnitude, seed).numpy()
      for image, seed in zip(images, seeds, strict=True)
    ]
  )
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
  want = np.stack(
    [ref.apply_op(images[i], i, magnitude, seeds[i]).numpy() for i in range(ra.NUM_OPS)]
  )
  got = ref.apply_layer_batch(tf.constant(images), op_indices, draws, magnitude)
  np.testing.assert_array_equal(got.numpy(), want)

  def layer(batch):
    return ref.apply_layer_batch(batch, op_indices, draws, magnitude)

  def per_image(batch):
    return tf.map_fn(
      lambda args: ref.apply_op(args[0], args[1], magnitude, args[2]),
      (batch, op_indices, seeds),
      fn_output_signature=tf.uint8,
    )

  for fn in (layer, per_image):
    np.testing.assert_array_equal(tf.function(fn)(images).numpy(), want)
  unknown_shape = tf.function(
    layer, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)]
  )
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
    x = random_image(17, 23)
    got = ops.shift(tf.constant(x[None]), *shift)[0].numpy()
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
      tf.random.experimental.stateless_fold_in(base_seed, index), tf.shape(batch)[0]
    )
    return ra.randaugment_batch(batch, seeds, num_layers=4, magnitude=15)

  def run():
    ds = (
      tf.data.Dataset.from_tensor_slices(images)
      .batch(batch_size, drop_remainder=drop_remainder)
      .enumerate()
    )
    ds = ds.map(augment, num_parallel_calls=2)
    assert ds.element_spec.shape.as_list() == [batch_size if drop_remainder else None, 24, 20, 3]
    return list(ds.as_numpy_iterator())

  first, second = run(), run()
  assert len(first) == (2 if drop_remainder else 3)
  for index, (a, b) in enumerate(zip(first, second, strict=True)):
    np.testing.assert_array_equal(a, b)
    batch = images[index * batch_size : (index + 1) * batch_size]
    seeds = tf.random.experimental.stateless_split(
      tf.random.experimental.stateless_fold_in(base_seed, tf.constant(index, tf.int64)), len(batch)
    )
    np.testing.assert_array_equal(a, _per_image(batch, seeds, 4, 15))


@pytest.mark.parametrize(
  'images, seeds, match',
  [
    (np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 2), np.int64), 'uint8'),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((1, 2, 8, 8, 3), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((2, 8, 8, 1), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((2, 8, 8, 4), np.uint8), np.zeros((2, 2), np.int64), r'\[B, H, W, 3\]'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 3), np.int64), r'seeds .*\[B, 2\]'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2,), np.int64), r'seeds .*\[B, 2\]'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2), np.float32), r'seeds .*int32/int64'),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 2), np.int64), 'one row per image'),
  ],
)
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
  @tf.function(
    input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.uint8), tf.TensorSpec([None, 2], tf.int64)]
  )
  def dynamic(images, seeds):
    return ra.randaugment_batch(images, seeds, num_layers=2, magnitude=10)

  with pytest.raises(tf.errors.InvalidArgumentError, match='one row per image'):
    dynamic(images, np.zeros((3, 2), np.int64))
  np.testing.assert_array_equal(
    ra.randaugment_batch(images, seeds, num_layers=0, magnitude=10).numpy(), images
  )
