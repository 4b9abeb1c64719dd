"""Classification loss and accuracy for NFNet training (arXiv 2102.06171 section 3).

Training runs the forward pass in bfloat16; as in the paper, the logits are
cast to float32 before the softmax so that the loss (and its gradient) is
computed in full precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  'softmax_cross_entropy',
  'distillation_cross_entropy',
  'topk_correct',
  'label_set_top1_correct',
]


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


def distillation_cross_entropy(
  logits,
  teacher_logits,
  labels,
  num_classes: int,
  weight: float,
  temperature: float,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Per-example knowledge-distillation loss, in float32:

    (1 - weight) * CE(labels, softmax(s))
      + weight * T^2 * CE(softmax(t / T), softmax(s / T))

  with `CE(p, q) = -sum_c p_c log q_c`, student logits `s`, teacher logits `t` and
  temperature `T` (Hinton, Vinyals, Dean 2015, arXiv 1503.02531 section 2: the soft
  targets' gradients scale as 1 / T^2, so the T^2 keeps the two terms' relative weight
  when T changes; He et al. 2018, "Bag of Tricks", arXiv 1812.01187 section 5.4, the same
  two cross-entropies with weights 1 and T^2, i.e. `weight = 1/2` up to a factor 2).
  The teacher term is a cross-entropy, as in both papers, not KL(p_t || p_s): the two differ
  by the teacher's entropy, which is constant in the student, so their gradients agree and
  only the logged loss differs.

  Args:
    logits: [..., C] student logits (any float dtype; cast to float32).
    teacher_logits: [..., C] teacher logits; the caller stops their gradient.
    labels: integer class ids [...] or label distributions [..., C] (MixUp/CutMix soft
      labels), as for `softmax_cross_entropy`.
    num_classes: C.
    weight: the teacher term's weight in [0, 1] (0: the label loss alone).
    temperature: T > 0.
    label_smoothing: applied to the label term only (the teacher's distribution is
      already soft).

  Returns:
    float32 losses of shape [...].
  """
  hard = softmax_cross_entropy(logits, labels, num_classes, label_smoothing)
  teacher_logits = jnp.asarray(teacher_logits)
  if teacher_logits.shape[-1] != num_classes:
    raise ValueError(
      f'teacher logits have {teacher_logits.shape[-1]} classes, num_classes={num_classes}.'
    )
  targets = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  soft = softmax_cross_entropy(
    jnp.asarray(logits).astype(jnp.float32) / temperature, targets, num_classes
  )
  return (1.0 - weight) * hard + weight * temperature**2 * soft


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
