"""Classification loss and accuracy for NFNet training (arXiv 2102.06171 section 3).

Training runs the forward pass in bfloat16; as in the paper, the logits are
cast to float32 before the softmax so that the loss (and its gradient) is
computed in full precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ['softmax_cross_entropy', 'topk_correct', 'label_set_top1_correct']


def _as_label_distribution(labels, logits_shape) -> jax.Array:
  """Int class ids [...] -> one-hot [..., C]; label vectors [..., C] -> float32."""
  labels = jnp.asarray(labels)
  num_classes = logits_shape[-1]
  if labels.shape == tuple(logits_shape):  # Already a distribution (soft labels).
    return labels.astype(jnp.float32)
  if labels.shape != tuple(logits_shape[:-1]) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      'labels must be integer class ids of shape '
      f'{tuple(logits_shape[:-1])} or label vectors of shape '
      f'{tuple(logits_shape)}; got dtype {labels.dtype} and shape '
      f'{labels.shape}.'
    )
  # Ids outside [0, num_classes) (e.g. -1 for padding) give an all-zero row.
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def softmax_cross_entropy(
  logits, labels, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example softmax cross-entropy, in float32.

  Args:
    logits: [..., C] logits, any float dtype (bf16 from the forward pass is
      cast to float32 first).
    labels: integer class ids of shape [...] or label distributions of shape
      [..., C] (MixUp/CutMix produce soft labels that sum to 1).
    num_classes: C; must equal ``logits.shape[-1]``.
    label_smoothing: ``ls``; the target becomes ``labels * (1 - ls) + ls / C``
      (0.1 in the published recipe).  Applied to soft labels as well.

  Returns:
    float32 losses of shape [...] (one per example, not averaged).
  """
  logits = jnp.asarray(logits)
  if logits.shape[-1] != num_classes:
    raise ValueError(f'logits have {logits.shape[-1]} classes, num_classes={num_classes}.')
  logits = logits.astype(jnp.float32)
  targets = _as_label_distribution(labels, logits.shape)
  # Applied unconditionally (exact for ls = 0) so ls may also be a traced value.
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(targets * log_probs, axis=-1)


def topk_correct(logits, labels, k: int) -> jax.Array:
  """Per-example top-k correctness as float32 0/1.

  Args:
    logits: [B, C] logits.
    labels: integer class ids [B], or soft labels [B, C] (their argmax is the
      class, e.g. after label mixing).
    k: how many top predictions count; values above C count every example as
      correct.  Ties between logits are broken towards the lower class index.

  Returns:
    float32 array [B], 1.0 where the label is among the k largest logits.
  """
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}.')
  logits = jnp.asarray(logits).astype(jnp.float32)
  labels = jnp.asarray(labels)
  if labels.ndim == logits.ndim:
    labels = jnp.argmax(labels, axis=-1)
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = jnp.any(top == labels[..., None].astype(top.dtype), axis=-1)
  return hit.astype(jnp.float32)


def label_set_top1_correct(logits, label_sets) -> jax.Array:
  """Per-example multi-label top-1 correctness as float32 0/1: the top prediction is any
  of the example's correct classes (ImageNet ReaL accuracy, Beyer et al. 2020, arXiv
  2006.07159 section 4).

  Args:
    logits: [B, C] logits.
    label_sets: [B, C] multi-hot (bool or 0/1) sets of correct classes. An empty set
      scores 0 here; ReaL leaves such examples out of the denominator, which is the
      caller's mask.

  Returns:
    float32 array [B]. Ties between logits go to the lower class index, as in
    ``topk_correct``.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  label_sets = jnp.asarray(label_sets)
  if label_sets.shape != logits.shape:
    raise ValueError(
      f"label_sets must be multi-hot of the logits' shape {logits.shape}; got {label_sets.shape}."
    )
  top = jnp.argmax(logits, axis=-1)
  hit = jnp.take_along_axis(label_sets, top[..., None], axis=-1)[..., 0]
  return (hit > 0).astype(jnp.float32)
