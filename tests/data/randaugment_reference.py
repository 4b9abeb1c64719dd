"""Per-image RandAugment: the reference the batched production path is tested against.

One function per op on a single uint8 [H, W, 3] image (the library's batched op from
``nfnet_jax.data.augment.ops`` on a batch of one; the geometric ops run the transform
kernel directly rather than through pixel maps), ``apply_op`` (one op chosen by index,
with its random sign and Cutout centre drawn from a seed) and ``randaugment`` (N layers
of ``apply_op``, with the same draws as ``randaugment.randaugment_batch``). Each op is
checked against Pillow; ``randaugment_batch`` must equal ``randaugment`` image by image.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from nfnet_jax.data.augment import ops
from nfnet_jax.data.augment import randaugment as ra

# As in the library: the functions branch on Python values only, AutoGraph would only
# slow their tracing down.
_no_autograph = tf.autograph.experimental.do_not_convert


def _check_image(image: Any, name: str = 'image') -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(
      f'{name} must be uint8 with values 0..255, got dtype {image.dtype.name}; '
      'augment before normalising, or convert with '
      'tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).'
    )
  shape = image.shape
  if shape.rank != 3 or shape[-1] != 3:
    raise ValueError(
      f'{name} must have static shape [H, W, 3] (one RGB image), got {shape}; '
      'augment batches with randaugment_batch and, if the shape is unknown inside '
      'tf.data, declare it with image.set_shape([None, None, 3]).'
    )
  return image


def _check_seed(seed: Any) -> tf.Tensor:
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or not seed.shape.is_compatible_with([2]):
    raise ValueError(
      f'seed must be an int32/int64 tensor of shape [2], got {seed.dtype.name} '
      f'{seed.shape}; derive one per example, e.g. with '
      'tf.random.experimental.stateless_split or stateless_fold_in.'
    )
  return seed


def _on_one(batch_fn: Callable[..., tf.Tensor], image: tf.Tensor, *args: Any) -> tf.Tensor:
  """Runs a batched op of ``ops`` on one image, as a batch of one."""
  # expand_dims / squeeze rather than [None] / [0]: fewer graph nodes, which matters
  # for the per-image graph (16 ops per layer, each a switch_case branch).
  out = tf.squeeze(batch_fn(tf.expand_dims(image, 0), *args), [0])
  out.set_shape(image.shape)
  return out


# ---------------------------------------------------------------- pixel and enhance ops


@_no_autograph
def auto_contrast(image: Any) -> tf.Tensor:
  """``ops.auto_contrast`` (``PIL.ImageOps.autocontrast``) of one image."""
  return _on_one(ops.auto_contrast, _check_image(image))


@_no_autograph
def equalize(image: Any) -> tf.Tensor:
  """``ops.equalize`` (``PIL.ImageOps.equalize``) of one image."""
  return _on_one(ops.equalize, _check_image(image))


@_no_autograph
def invert(image: Any) -> tf.Tensor:
  """255 - x, as ``PIL.ImageOps.invert``."""
  return _on_one(ops.invert, _check_image(image))


@_no_autograph
def posterize(image: Any, bits: Any) -> tf.Tensor:
  """``ops.posterize`` (``PIL.ImageOps.posterize``; ``bits`` clipped to [0, 8])."""
  return _on_one(ops.posterize, _check_image(image), bits)


@_no_autograph
def solarize(image: Any, threshold: Any) -> tf.Tensor:
  """``ops.solarize`` (``PIL.ImageOps.solarize``): inverts values >= threshold."""
  return _on_one(ops.solarize, _check_image(image), threshold)


@_no_autograph
def solarize_add(image: Any, addition: Any, threshold: Any = 128) -> tf.Tensor:
  """``ops.solarize_add``: adds ``addition`` to values below ``threshold``, clipped."""
  return _on_one(ops.solarize_add, _check_image(image), addition, threshold)


@_no_autograph
def color(image: Any, factor: Any) -> tf.Tensor:
  """``ops.color`` (``PIL.ImageEnhance.Color(image).enhance(factor)``)."""
  return _on_one(ops.color, _check_image(image), factor)


@_no_autograph
def contrast(image: Any, factor: Any) -> tf.Tensor:
  """``ops.contrast`` (``PIL.ImageEnhance.Contrast(image).enhance(factor)``)."""
  return _on_one(ops.contrast, _check_image(image), factor)


@_no_autograph
def brightness(image: Any, factor: Any) -> tf.Tensor:
  """``ops.brightness`` (``PIL.ImageEnhance.Brightness(image).enhance(factor)``)."""
  return _on_one(ops.brightness, _check_image(image), factor)


@_no_autograph
def sharpness(image: Any, factor: Any) -> tf.Tensor:
  """``ops.sharpness`` (``PIL.ImageEnhance.Sharpness(image).enhance(factor)``)."""
  return _on_one(ops.sharpness, _check_image(image), factor)


# ---------------------------------------------------------------- geometric ops and cutout


def _affine(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
  """``Image.transform(size, AFFINE, ..., NEAREST, fillcolor=128)`` on one image.

  Applies the kernel directly, not through a pixel map: the batched path remaps through
  maps computed by this same kernel, so the two must agree exactly.
  """
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform[None],
    output_shape=tf.shape(image)[:2],
    fill_value=tf.constant(ops.FILL_VALUE, tf.float32),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )[0]
  out.set_shape(image.shape)
  return out


@_no_autograph
def rotate(image: Any, degrees: Any) -> tf.Tensor:
  """``Image.rotate(degrees, NEAREST, fillcolor=128)``: counter-clockwise, same size."""
  image = _check_image(image)
  shape = tf.shape(image)
  return _affine(image, ops.geometric_transform('Rotate', degrees, shape[0], shape[1]))


@_no_autograph
def shear_x(image: Any, level: Any) -> tf.Tensor:
  """Output (x, y) samples input (x + level * y, y): Pillow AFFINE (1, level, 0, 0, 1, 0)."""
  image = _check_image(image)
  return _affine(image, ops.geometric_transform('ShearX', level, None, None))


@_no_autograph
def shear_y(image: Any, level: Any) -> tf.Tensor:
  """Output (x, y) samples input (x, y + level * x): Pillow AFFINE (1, 0, 0, level, 1, 0)."""
  image = _check_image(image)
  return _affine(image, ops.geometric_transform('ShearY', level, None, None))


@_no_autograph
def translate_x(image: Any, pixels: Any) -> tf.Tensor:
  """Output (x, y) samples input (x + pixels, y): Pillow AFFINE (1, 0, pixels, 0, 1, 0)."""
  image = _check_image(image)
  return _affine(image, ops.geometric_transform('TranslateX', pixels, None, None))


@_no_autograph
def translate_y(image: Any, pixels: Any) -> tf.Tensor:
  """Output (x, y) samples input (x, y + pixels): Pillow AFFINE (1, 0, 0, 0, 1, pixels)."""
  image = _check_image(image)
  return _affine(image, ops.geometric_transform('TranslateY', pixels, None, None))


@_no_autograph
def cutout(image: Any, pad_size: Any, seed: Any) -> tf.Tensor:
  """``ops.cutout`` around a centre drawn from ``seed`` (uniform over the pixels)."""
  image = _check_image(image)
  seed = _check_seed(seed)
  shape = tf.shape(image)
  _, row, column = ra.op_draws(seed, shape[0], shape[1])
  return _on_one(ops.cutout, image, pad_size, tf.stack([row, column])[None])


# ---------------------------------------------------------------- RandAugment


@_no_autograph
def apply_op(image: Any, op_index: Any, magnitude: float, seed: Any) -> tf.Tensor:
  """Applies op ``OP_NAMES[op_index]`` at ``magnitude``; only that op is executed.

  Args:
    image: uint8 [H, W, 3].
    op_index: int scalar (tensor) in [0, NUM_OPS).
    magnitude: m >= 0, a Python number.
    seed: stateless random seed, int32/int64 [2]; draws the sign of signed ops and the
      Cutout position (``randaugment.op_draws``).

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  args = ra.op_arguments(magnitude)
  seed = _check_seed(seed)
  shape = tf.shape(image)
  negative, row, column = ra.op_draws(seed, shape[0], shape[1])
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
    'Cutout': lambda: _on_one(ops.cutout, image, args['Cutout'], tf.stack([row, column])[None]),
    'SolarizeAdd': lambda: solarize_add(image, args['SolarizeAdd']),
  }
  out = tf.switch_case(tf.cast(op_index, tf.int32), [branches[name] for name in ra.OP_NAMES])
  out.set_shape(image.shape)
  return out


@_no_autograph
def randaugment(image: Any, seed: Any, *, num_layers: int, magnitude: float) -> tf.Tensor:
  """RandAugment on one image: ``num_layers`` ops, each uniform over the 16.

  Works eagerly and inside ``tf.data.Dataset.map`` / ``tf.function``, with H and W
  possibly dynamic; the output is a deterministic function of (image, seed).

  Args:
    image: uint8 [H, W, 3].
    seed: stateless random seed, int32/int64 [2].
    num_layers: N >= 0; 0 returns the image unchanged.
    magnitude: m >= 0, a Python number.

  Returns:
    uint8 [H, W, 3].
  """
  image = _check_image(image)
  ra._check_num_layers(num_layers)
  ra._check_magnitude(magnitude)
  if num_layers == 0:
    return image
  seed = _check_seed(seed)
  op_indices, op_seeds = ra.layer_choices(seed, num_layers)

  def layer(index: tf.Tensor, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return index + 1, apply_op(image, op_indices[index], magnitude, op_seeds[index])

  # A loop rather than num_layers copies of apply_op's 16-branch switch keeps the graph
  # small. (Eagerly, tf.while_loop is a plain Python loop.)
  _, image = tf.while_loop(
    lambda index, _: index < num_layers,
    layer,
    (tf.constant(0), image),
    maximum_iterations=num_layers,
  )
  return image


def apply_layer_batch(
  images: tf.Tensor,
  op_indices: tf.Tensor,
  draws: tf.Tensor,
  magnitude: float,
  plan: tuple[Any, Any] | None = None,
) -> tf.Tensor:
  """One RandAugment layer of the batched path: image i gets op ``OP_NAMES[op_indices[i]]``.

  Equal to ``apply_op(images[i], op_indices[i], magnitude, op_seed)`` for every i
  when ``draws[i]`` is what ``op_seed`` draws (see ``randaugment.op_draws``).

  Args:
    images: uint8 [B, H, W, 3].
    op_indices: int32 [B], values in [0, NUM_OPS).
    draws: int32 [B, 3]: per image 1 if a signed op takes its negative argument else
      0, and the Cutout centre row and column.
    magnitude: m >= 0, a Python number.
    plan: ``randaugment._geometric_plan(magnitude, H, W)``, or None to make it there.

  Returns:
    uint8 [B, H, W, 3].
  """
  return ra.augment_layers(images, op_indices[:, None], draws[:, None], magnitude, plan)
