"""Batch-level MixUp and CutMix (graph-mode safe, stateless randomness).

NFNet recipe (arXiv 2102.06171 section 3): the first half of every batch gets MixUp
(alpha = 0.2), the second half CutMix; RandAugment runs after mixing.

Conventions shared by every function here:
  * images: float32 [B, H, W, C] (0..255 in this project; any values work) or uint8
    pixels; labels: int [B] (then ``num_classes`` is required) or soft float
    [B, num_classes]. Outputs: images of the same shape and dtype (uint8 MixUp rounds to
    the nearest level: the training pipeline keeps uint8 batches, a quarter of float32's
    memory traffic, and RandAugment would round them next anyway; CutMix only moves
    pixels) and soft float32 labels [B, num_classes] that sum to 1.
  * Partner: example i is mixed with example n - 1 - i of the (half-)batch it is mixed
    in, i.e. with the batch reversed (no shuffle, so the pairing is free and
    deterministic). In a batch of odd size n the middle example is its own partner and
    comes out unchanged, with its own label.
  * Randomness: one draw per example (a MixUp lambda, a CutMix box), as in the DeepMind
    NFNet pipeline, which draws them in its per-example map. With per-batch draws
    (timm's default) the mixing strength of a whole step jumps with a single Beta sample
    (with alpha = 0.2 most draws are near 0 or 1); per-example draws average over the
    batch. Everything is a function of the [2] integer seed.

MixUp: lam ~ Beta(alpha, alpha) (the ratio of two Gamma(alpha) draws; no TF Probability),
x = lam * x + (1 - lam) * x_partner, y likewise. alpha = 0 disables MixUp (Beta(0, 0)
is not a distribution; timm uses the same convention).

CutMix (Yun et al., 2019, with Beta(1, 1) = U(0, 1) as in the paper's ImageNet runs):
lam ~ U(0, 1) is the nominal fraction of the image that is kept; the pasted box has
height floor(sqrt(1 - lam) * H) and width floor(sqrt(1 - lam) * W), so its nominal area
proportion 1 - lam is also U(0, 1) (up to the floors). Its centre (cy, cx) is a uniform
pixel; it covers rows [cy - h // 2, cy - h // 2 + h) and the analogous columns, clipped
to the image. The box takes the partner's pixels; the label weight of the partner is the
pasted area after clipping, (y1 - y0) * (x1 - x0) / (H * W), not the nominal 1 - lam.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf


def one_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  """int labels [B] -> float32 one-hot [B, num_classes]."""
  return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)


def _soft_labels(labels: Any, num_classes: int | None) -> tf.Tensor:
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank == 2:
    return tf.cast(labels, tf.float32)
  if labels.shape.rank != 1:
    raise ValueError(f'labels must be int [B] or soft [B, C], got shape {labels.shape}.')
  if labels.dtype.is_floating:
    raise ValueError('1-D labels must be integer class indices (soft labels are [B, C]).')
  if num_classes is None:
    raise ValueError('num_classes is required for integer labels.')
  return one_hot(labels, num_classes)


def _as_images(images: Any) -> tf.Tensor:
  images = tf.convert_to_tensor(images)
  return images if images.dtype == tf.uint8 else tf.cast(images, tf.float32)


def _check_alpha(alpha: Any) -> float:
  if (
    isinstance(alpha, bool)
    or not isinstance(alpha, (int, float))
    or not math.isfinite(alpha)
    or alpha < 0
  ):
    raise ValueError(f'alpha must be a finite number >= 0, got {alpha!r}.')
  return float(alpha)


def _split(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def sample_beta(seed: tf.Tensor, alpha: float, shape) -> tf.Tensor:
  """float32 Beta(alpha, alpha) samples of ``shape`` (alpha > 0), as G1 / (G1 + G2)."""
  seed_1, seed_2 = _split(seed, 2)
  # float64: for alpha = 0.2 a float32 Gamma draw underflows to 0 about once in 3e7,
  # and both at once would give 0 / 0.
  gamma_1 = tf.random.stateless_gamma(shape, seed_1, alpha=alpha, dtype=tf.float64)
  gamma_2 = tf.random.stateless_gamma(shape, seed_2, alpha=alpha, dtype=tf.float64)
  total = gamma_1 + gamma_2
  lam = tf.where(total > 0, tf.math.divide_no_nan(gamma_1, total), 0.5)
  return tf.cast(lam, tf.float32)


def mixup(
  images: tf.Tensor,
  labels: tf.Tensor,
  seed: tf.Tensor,
  alpha: float,
  *,
  num_classes: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
  """MixUp with the reversed batch, one lam ~ Beta(alpha, alpha) per example.

  Returns (images [B, H, W, C] of the input dtype, labels float32 [B, num_classes]).
  """
  alpha = _check_alpha(alpha)
  images = _as_images(images)
  labels = _soft_labels(labels, num_classes)
  if alpha == 0:
    return images, labels
  lam = sample_beta(seed, alpha, tf.shape(images)[:1])
  lam_labels = lam[:, None]
  mixed = _blend_with_partner(images, lam)
  if images.dtype == tf.uint8:  # a convex combination of 0..255 stays in 0..255
    mixed = tf.cast(tf.round(mixed), tf.uint8)
  labels = lam_labels * labels + (1.0 - lam_labels) * tf.reverse(labels, [0])
  return mixed, labels


def cutmix_boxes(
  seed: tf.Tensor, batch_size: tf.Tensor, height: tf.Tensor, width: tf.Tensor
) -> tf.Tensor:
  """The clipped CutMix boxes [y0, y1, x0, x1] per example (int32 [batch_size, 4]); the
  box is rows y0 <= y < y1, columns x0 <= x < x1 (possibly empty)."""
  seed_lam, seed_y, seed_x = _split(seed, 3)
  shape = tf.reshape(batch_size, [1])
  lam = tf.random.stateless_uniform(shape, seed_lam, dtype=tf.float32)
  side = tf.sqrt(1.0 - lam)
  box_h = tf.cast(tf.floor(side * tf.cast(height, tf.float32)), tf.int32)
  box_w = tf.cast(tf.floor(side * tf.cast(width, tf.float32)), tf.int32)
  centre_y = tf.random.stateless_uniform(shape, seed_y, minval=0, maxval=height, dtype=tf.int32)
  centre_x = tf.random.stateless_uniform(shape, seed_x, minval=0, maxval=width, dtype=tf.int32)
  top = centre_y - box_h // 2
  left = centre_x - box_w // 2
  return tf.stack(
    [
      tf.clip_by_value(top, 0, height),
      tf.clip_by_value(top + box_h, 0, height),
      tf.clip_by_value(left, 0, width),
      tf.clip_by_value(left + box_w, 0, width),
    ],
    axis=1,
  )


def cutmix(
  images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, *, num_classes: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
  """CutMix with the reversed batch, one box per example (see the module docstring).

  Returns (images [B, H, W, C] of the input dtype, labels float32 [B, num_classes]).
  """
  return _cutmix(_as_images(images), _soft_labels(labels, num_classes), seed)


@tf.function(jit_compile=True)
def _blend_with_partner(images: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
  """float32 lam_i * x_i + (1 - lam_i) * x_{B-1-i}, fused by XLA into one pass (TF runs
  the five element-wise ops as five passes over the batch)."""
  x = tf.cast(images, tf.float32)
  lam = lam[:, None, None, None]
  return lam * x + (1.0 - lam) * tf.reverse(x, [0])


# XLA fuses the mask and the select into one pass over the batch: TensorFlow's own
# broadcasting select is ~10x slower on CPU (0.5 ms per 192 px image), a quarter of the
# whole per-image budget of the input pipeline. Only integer comparisons and a select
# are compiled, so the result is bit-identical.
@tf.function(jit_compile=True)
def _paste_partner_boxes(images: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
  """Example i takes the pixels of example B-1-i inside its box [y0, y1, x0, x1]."""
  shape = tf.shape(images)
  y0, y1, x0, x1 = tf.unstack(boxes, axis=1)
  rows = tf.range(shape[1])[None, :]
  cols = tf.range(shape[2])[None, :]
  in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])  # [B, H]
  in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # [B, W]
  in_box = in_rows[:, :, None, None] & in_cols[:, None, :, None]  # [B, H, W, 1]
  return tf.where(tf.broadcast_to(in_box, shape), tf.reverse(images, [0]), images)


def _cutmix(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  shape = tf.shape(images)
  batch_size, height, width = shape[0], shape[1], shape[2]
  boxes = cutmix_boxes(seed, batch_size, height, width)
  images = _paste_partner_boxes(images, boxes)
  y0, y1, x0, x1 = tf.unstack(boxes, axis=1)
  pasted = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(height * width, tf.float32)
  pasted = pasted[:, None]
  labels = (1.0 - pasted) * labels + pasted * tf.reverse(labels, [0])
  return images, labels


def mixup_cutmix(
  images: tf.Tensor,
  labels: tf.Tensor,
  seed: tf.Tensor,
  *,
  alpha: float = 0.2,
  cutmix: bool = True,
  num_classes: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
  """MixUp on the first ceil(B / 2) examples, CutMix on the other floor(B / 2).

  An odd batch gives the extra example to MixUp. Each half is mixed within itself (with
  itself reversed). With only one of the two enabled (``alpha=0`` turns MixUp off,
  ``cutmix=False`` CutMix) it applies to the whole batch; with neither, the images pass
  through and the labels become one-hot.

  Returns (images [B, H, W, C] of the input dtype, labels float32 [B, num_classes]).
  """
  alpha = _check_alpha(alpha)
  images = _as_images(images)
  labels = _soft_labels(labels, num_classes)
  if alpha == 0 and not cutmix:
    return images, labels
  if not cutmix:
    return mixup(images, labels, seed, alpha)
  if alpha == 0:
    return _cutmix(images, labels, seed)
  seed_mixup, seed_cutmix = _split(seed, 2)
  num_mixup = (tf.shape(images)[0] + 1) // 2
  mixed_images, mixed_labels = mixup(images[:num_mixup], labels[:num_mixup], seed_mixup, alpha)
  cut_images, cut_labels = _cutmix(images[num_mixup:], labels[num_mixup:], seed_cutmix)
  return (
    tf.concat([mixed_images, cut_images], axis=0),
    tf.concat([mixed_labels, cut_labels], axis=0),
  )
