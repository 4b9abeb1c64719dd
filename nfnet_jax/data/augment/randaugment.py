"""RandAugment (Cubuk et al., 2020) as the NFNet training recipe uses it, in core TensorFlow.

In the NFNet recipe RandAugment runs *after* MixUp/CutMix (arXiv 2102.06171 section 3):
the pipeline mixes each per-device batch, rounds the mixed images to uint8 and augments
every image with its own seed: ``randaugment_batch(images, seeds, num_layers=N,
magnitude=m)`` augments a [B, H, W, 3] batch with one seed per image. Each of the N
layers (4 in the recipe) draws one of the 16 ops below uniformly at random and *always*
applies it (there is no per-op application probability), at the same magnitude m for
every layer. Geometric ops and Cutout fill uncovered pixels with grey 128
(RGB (128, 128, 128)).

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

The ops themselves (``ops``) follow the Pillow functions they are named after, which
the tests check pixel by pixel. Randomness comes only from ``tf.random.stateless_*`` ops
keyed by each image's seed, so the same (image, seed) always gives the same output,
however tf.data schedules the map calls and whatever else is in the batch; the tests
check every batch bit for bit against a per-image reference that applies one op at a
time with the same draws.

``randaugment_batch`` sends each image of a layer to its op's sub-batch
(``tf.dynamic_partition``), runs each op once on its sub-batch and puts the results back
in place (``tf.dynamic_stitch``), so every image is touched only by the op it drew. The
op arguments depend only on m, so the geometric ops reduce to 10 fixed pixel maps (5 ops
x 2 signs) computed once per (m, H, W).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from nfnet_jax.data.augment import ops

NUM_OPS = 16
OP_NAMES: tuple[str, ...] = (
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
# Ops whose argument gets a random sign each time they are applied.
SIGNED_OPS: frozenset[str] = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'})

assert len(OP_NAMES) == NUM_OPS

# Everything here branches on Python values only; converting it with AutoGraph (which
# tf.data.Dataset.map and tf.function apply to the code they call) only costs seconds
# of tracing.
_no_autograph = tf.autograph.experimental.do_not_convert

# The signed ops are the geometric ones; the batched path gives each (op, sign) pair a
# pixel map, numbered 2 * (position in this tuple) + (1 if the sign is negative).
_GEOMETRIC_OPS: tuple[str, ...] = tuple(name for name in OP_NAMES if name in SIGNED_OPS)

assert _GEOMETRIC_OPS == ops.GEOMETRIC_OPS


def _check_images(images: Any) -> tf.Tensor:
  images = tf.convert_to_tensor(images)
  if images.dtype != tf.uint8:
    raise ValueError(
      f'images must be uint8 with values 0..255, got dtype {images.dtype.name}; '
      'augment before normalising, or convert with '
      'tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).'
    )
  shape = images.shape
  if shape.rank != 4 or shape[-1] != 3:
    raise ValueError(
      f'images must have static shape [B, H, W, 3] (a batch of RGB images), got '
      f'{shape}; use randaugment for a single image and, if the shape is unknown '
      'inside tf.data, declare it with images.set_shape([None, H, W, 3]).'
    )
  return images


def _check_seeds(seeds: Any, images: tf.Tensor) -> tf.Tensor:
  seeds = tf.convert_to_tensor(seeds)
  if seeds.dtype not in (tf.int32, tf.int64) or not seeds.shape.is_compatible_with([None, 2]):
    raise ValueError(
      f'seeds must be an int32/int64 tensor of shape [B, 2] (one seed per image), '
      f'got {seeds.dtype.name} {seeds.shape}; derive them e.g. with '
      'tf.random.experimental.stateless_split(seed, B).'
    )
  if not seeds.shape[:1].is_compatible_with(images.shape[:1]):
    raise ValueError(
      f'seeds must have one row per image: got {seeds.shape[0]} seeds for a batch '
      f'of {images.shape[0]} images.'
    )
  return seeds


def _check_num_layers(num_layers: Any) -> int:
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(
      f'num_layers must be an int >= 0, got {num_layers!r}; the NFNet recipe uses 4 '
      '(0 disables RandAugment).'
    )
  return num_layers


def _check_magnitude(magnitude: Any) -> float:
  if isinstance(magnitude, bool) or not isinstance(magnitude, numbers.Real):
    raise ValueError(
      f'magnitude must be a Python number, got {type(magnitude).__name__}; it is a '
      'fixed hyperparameter (e.g. 10 or 15), pass it as a float.'
    )
  if not magnitude >= 0:
    raise ValueError(
      f'magnitude must be >= 0, got {magnitude}; RandAugment magnitudes are '
      "non-negative (m = 10 is the paper's full strength, NFNets use 10..20)."
    )
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


# The random draws of one image: its seed alone determines them, whether the image is
# augmented alone or in a batch (per seed, unrolled or in a map_fn). They take
# 1 + num_layers stateless draws per image: batched, these per-seed draws run one after
# another, so their number matters.


def layer_choices(seed: tf.Tensor, num_layers: int) -> tuple[tf.Tensor, tf.Tensor]:
  """The op index of each layer (int32 [L]) and each op's own seed ([L, 2], seed's dtype).

  One draw of [num_layers, 3] full-range integers: row l's first two columns are
  layer l's op seed (as ``stateless_split`` would make it) and the third picks its op;
  the residue mod 16 of a full-range integer is exactly uniform.
  """
  bits = tf.random.stateless_uniform(
    [num_layers, 3], seed, minval=None, maxval=None, dtype=seed.dtype
  )
  return tf.cast(tf.math.floormod(bits[:, 2], NUM_OPS), tf.int32), bits[:, :2]


def op_draws(op_seed: tf.Tensor, height: Any, width: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(negative, row, column) drawn from one op's seed.

  ``negative`` (bool scalar, probability 1/2) negates a signed op's argument; (row,
  column) (int32 scalars) is the Cutout centre, uniform over the pixels up to a bias
  of H / 2**32.
  """
  bits = tf.random.stateless_uniform([3], op_seed, minval=None, maxval=None, dtype=tf.int32)
  return (bits[0] < 0, tf.math.floormod(bits[1], height), tf.math.floormod(bits[2], width))


def _image_draws(seed: tf.Tensor, num_layers: int, height: Any, width: Any) -> tf.Tensor:
  """All random choices for one image: int32 [num_layers, 4].

  Row l is (op index, 1 if a signed op is negated else 0, Cutout centre row, column)
  of layer l: ``layer_choices`` draws the op index and an op seed per layer, and
  ``op_draws`` the rest from the op seed.
  """
  rows = []
  op_indices, op_seeds = layer_choices(seed, num_layers)
  for op_index, op_seed in zip(tf.unstack(op_indices), tf.unstack(op_seeds), strict=True):
    negative, row, column = op_draws(op_seed, height, width)
    rows.append(tf.stack([op_index, tf.cast(negative, tf.int32), row, column]))
  return tf.stack(rows)


# ---------------------------------------------------------------- batched RandAugment


def _geometric_plan(
  magnitude: float, height: Any, width: Any
) -> tuple[tf.Tensor, tuple[tuple[int, int] | None, ...]]:
  """The geometric ops' pixel maps at m, and which of them are plain shifts.

  Returns (maps, shifts): maps is int32 [10, H * W] (see ``ops.pixel_maps``), map
  2 * i + s being op ``_GEOMETRIC_OPS[i]`` with sign -1 if s else +1; shifts[j] is
  (dy, dx) when map j is exactly a whole-pixel translation (cheaper to apply by
  slicing), else None. With static H and W the maps are computed once, eagerly, and
  embedded as a constant; otherwise they are computed in the graph and none counts as
  a shift.
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
  magnitude: float, height: int, width: int
) -> tuple[np.ndarray, tuple[tuple[int, int] | None, ...]]:
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
      # The float64 product sign * argument: an op applied on its own with this
      # argument gets exactly the same transform.
      value = tf.constant(sign, tf.float64) * args[name]
      transforms.append(ops.geometric_transform(name, value, height, width))
  return ops.pixel_maps(tf.stack(transforms), height, width)


def _layer_kernels(
  magnitude: float, channels: tf.Tensor
) -> dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None]:
  """The non-geometric ops at m, as functions of (sub-batch, its draws).

  Args:
    magnitude: m >= 0, a Python number.
    channels: ``ops.lut_channels`` of the images, shared by the LUT ops.

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
    'AutoContrast': lambda images, draws: ops.auto_contrast(images, channels),
    'Equalize': lambda images, draws: ops.equalize(images, channels),
    'Invert': lambda images, draws: ops.invert(images),
    'Posterize': (
      None
      if args['Posterize'] >= 8
      else lambda images, draws: ops.posterize(images, args['Posterize'])
    ),
    'Solarize': (
      None
      if args['Solarize'] >= 256
      else lambda images, draws: ops.solarize(images, args['Solarize'])
    ),
    'Color': enhance(ops.color, args['Color']),
    'Contrast': enhance(ops.contrast, args['Contrast']),
    'Brightness': enhance(ops.brightness, args['Brightness']),
    'Sharpness': enhance(ops.sharpness, args['Sharpness']),
    'Cutout': (
      None
      if args['Cutout'] <= 0
      else lambda images, draws: ops.cutout(images, args['Cutout'], draws[:, 1:3])
    ),
    'SolarizeAdd': (
      None
      if args['SolarizeAdd'] == 0
      else lambda images, draws: ops.solarize_add(images, args['SolarizeAdd'], 128)
    ),
  }


def _layer_groups(
  op_indices: tf.Tensor,
  draws: tf.Tensor,
  magnitude: float,
  plan: tuple[Any, Any],
  channels: tf.Tensor,
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
    channels: ``ops.lut_channels`` of the images.

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
          fn = lambda part, part_draws: ops.remap(part, tf.gather(maps, part_draws[:, 3]))
          group_of_key.append(group('remap', fn))
        elif shift == (0, 0):
          group_of_key.append(0)
        else:
          fn = lambda part, part_draws, shift=shift: ops.shift(part, *shift)
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


def augment_layers(
  images: tf.Tensor,
  op_indices: tf.Tensor,
  draws: tf.Tensor,
  magnitude: float,
  plan: tuple[Any, Any] | None = None,
) -> tf.Tensor:
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
      magnitude,
      images.shape[1] if images.shape[1] is not None else shape[1],
      images.shape[2] if images.shape[2] is not None else shape[2],
    )
  channels = ops.lut_channels(images)
  outputs, positions = None, None
  for layer in range(op_indices.shape[1]):
    groups, group_draws, group_fns = _layer_groups(
      op_indices[:, layer], draws[:, layer], magnitude, plan, channels
    )
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
    outputs = [
      part if fn is None else fn(part, part_draws)
      for fn, part, part_draws in zip(group_fns, parts, draw_parts, strict=True)
    ]
  if outputs is None:
    return images
  out = tf.dynamic_stitch(positions, outputs)
  out.set_shape(images.shape)
  return out


@_no_autograph
def randaugment_batch(images: Any, seeds: Any, *, num_layers: int, magnitude: float) -> tf.Tensor:
  """RandAugment on a batch, one seed per image (see the module docstring).

  Image i's output depends on (images[i], seeds[i]) only, not on the rest of the batch:
  its random choices are drawn from its seed alone (``_image_draws``), and each op runs
  once per layer on the sub-batch of images that drew it. Works eagerly and inside
  ``tf.data.Dataset.map`` / ``tf.function``, with a static or dynamic batch size.

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
    with tf.control_dependencies(
      [
        tf.debugging.assert_equal(
          tf.shape(seeds)[0],
          shape[0],
          message='randaugment_batch: seeds must have one row per image',
        )
      ]
    ):
      seeds = tf.identity(seeds)
  height = images.shape[1] if images.shape[1] is not None else shape[1]
  width = images.shape[2] if images.shape[2] is not None else shape[2]
  if images.shape[0] is not None:
    # A static batch size (tf.data with drop_remainder=True) unrolls the per-seed
    # draws, which saves map_fn's loop overhead.
    draws = tf.stack(
      [
        _image_draws(seed, num_layers, height, width)
        for seed in tf.unstack(seeds, num=images.shape[0])
      ]
    )
  else:
    draws = tf.map_fn(
      lambda seed: _image_draws(seed, num_layers, height, width),
      seeds,
      fn_output_signature=tf.TensorSpec([num_layers, 4], tf.int32),
    )
  return augment_layers(
    images, draws[..., 0], draws[..., 1:], magnitude, _geometric_plan(magnitude, height, width)
  )
