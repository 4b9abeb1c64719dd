"""Optimisation pieces of the NFNet training recipe (Brock et al. 2021).

Everything here is an ordinary optax object or a pure function, so it composes
with any optax optimiser and works under ``jit``/``pmap``/``shard_map``:

* :func:`adaptive_grad_clip` -- unit-wise Adaptive Gradient Clipping (AGC,
  paper section 4.1, Eq. 3), chainable in front of any optax optimiser.
* :func:`is_classifier`, :func:`agc_mask`, :func:`weight_decay_mask` -- the
  parameter groups of the recipe, derived from Haiku module/parameter names.
* :func:`sgd_agc` -- the published optimiser: per parameter
  AGC -> coupled weight decay -> Nesterov momentum -> x(-lr).
* :func:`agc_clip_fraction` -- the fraction of units AGC clips (a metric).
* :func:`warmup_cosine_schedule` -- linear warmup then cosine decay, with the
  ``lr = base_lr * batch / 256`` scaling rule.
* :func:`rmsprop_tf`, :func:`warmup_exponential_schedule` -- the TF TPU EfficientNet's
  optimiser (TF1 RMSProp, L2 on all but batch norm) and its staircase schedule.
* :func:`ema_decay`, :func:`ema_update` -- the parameter EMA used for
  evaluation.

Haiku parameter trees are two-level dicts ``{module_path: {param_name: array}}``
such as ``{'NFNet/~/nf_block_3/~/conv1': {'w': ..., 'gain': ..., 'bias': ...}}``.
The same rules apply to the ``NF_ResNet`` and ``NF_RegNet`` families.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

__all__ = [
  'adaptive_grad_clip',
  'is_classifier',
  'agc_mask',
  'weight_decay_mask',
  'sgd_agc',
  'agc_clip_fraction',
  'warmup_cosine_schedule',
  'rmsprop_tf',
  'warmup_exponential_schedule',
  'batch_norm_free_mask',
  'ema_decay',
  'ema_update',
  'global_norm',
  'gradient_statistics',
  'update_norm',
  'NO_WEIGHT_DECAY_PARAMS',
]

PyTree = Any
Mask = Union[PyTree, Callable[[PyTree], PyTree]]


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm of a whole pytree (sqrt of the sum of squares of all leaves).

  Delegates to ``optax.tree.norm`` (``optax.global_norm`` is deprecated);
  offered here so training code takes every optimisation helper from one place.
  """
  return optax.tree.norm(tree)


# Haiku separates a module from its sub-modules with this token, e.g.
# 'NFNet/~/nf_block_3/~/conv1'.
_SUBMODULE_SEP = '/~/'

# Parameter names that the recipe (arXiv 2102.06171 section 3; DeepMind's optim.py)
# excludes from weight decay:
# the WSConv2D gains and biases, the biases of every hk.Linear (squeeze-excite
# and classifier alike, Haiku calls them 'b'), and each block's scalar
# ``skip_gain``.  Everything else is a weight and is decayed.
# Batch norm's `scale` and `offset` (the baselines'): DeepMind's released experiment.py
# leaves 'scale', 'offset', 'b' and gains/biases out of weight decay.
BATCH_NORM_PARAMS = frozenset({'scale', 'offset'})
NO_WEIGHT_DECAY_PARAMS = frozenset({'gain', 'bias', 'b', 'skip_gain'}) | BATCH_NORM_PARAMS


# ---------------------------------------------------------------------------
# Adaptive gradient clipping.
# ---------------------------------------------------------------------------


def adaptive_grad_clip(
  clipping: float, eps: float = 1e-3, *, mask: Optional[Mask] = None
) -> optax.GradientTransformation:
  """Unit-wise Adaptive Gradient Clipping (AGC), as an optax transformation.

  For every unit ``i`` (an output unit: axes (0, 1, 2) of an HWIO conv kernel,
  axis 0 of an IO linear weight; the whole tensor for scalars and for anything
  that is a vector once size-1 axes are squeezed) this computes, following
  Eq. 3 of the paper::

      max_norm_i = clipping * max(||W_i||, eps)
      G_i <- G_i * max_norm_i / max(||G_i||, 1e-6)   if ||G_i|| > max_norm_i
      G_i <- G_i                                      otherwise

  ``eps`` stops zero-initialised parameters (e.g. ``skip_gain`` or a zero-init
  classifier) from having their gradients clipped to zero.

  This is a thin, documented wrapper around :func:`optax.adaptive_grad_clip`,
  whose unit-wise norm and clipping rule are the ones above (a unit exactly at
  the threshold is rescaled by a factor of 1, i.e. left as is).  It needs the
  parameters: call ``update(grads, state, params)``.  It is stateless and can
  be chained in front of any optimiser::

      optax.chain(adaptive_grad_clip(0.01), optax.adam(1e-3))

  Args:
    clipping: the maximum allowed ratio ||G_i|| / max(||W_i||, eps); 0.01 in the
      published ImageNet recipe (batch 4096).
    eps: floor on the parameter norm.
    mask: optional pytree of bools with the params' structure (or a callable
      returning one, e.g. :func:`agc_mask`); only leaves marked ``True`` are
      clipped, the others pass through unchanged.  The paper does not clip the
      classifier weight, so use ``mask=agc_mask`` for NFNets.

  Returns:
    An ``optax.GradientTransformation``.
  """
  agc = optax.adaptive_grad_clip(clipping, eps)
  if mask is None:
    return agc
  # optax.masked replaces the masked-out leaves of *both* the updates and the
  # params by MaskedNode before calling the inner transformation, so AGC still
  # pairs every kept gradient with its own parameter (the trees stay aligned).
  return optax.masked(agc, mask)


def _unit_reduction_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Axes reduced by AGC's unit-wise norm for a parameter of ``shape``.

  Mirrors the inference inside ``optax.adaptive_grad_clip`` (which is what
  :func:`adaptive_grad_clip` uses), so the clip-fraction metric counts the same
  units the clipper acts on.  A test checks the two agree.
  """
  ndim = len(shape)
  squeezed_ndim = sum(1 for d in shape if d != 1)
  if squeezed_ndim <= 1:  # Scalars and (possibly padded) vectors: whole tensor.
    return tuple(range(ndim))
  if ndim in (2, 3):  # IO linear weights: one unit per output column.
    return (0,)
  if ndim == 4:  # HWIO conv kernels: one unit per output channel.
    return (0, 1, 2)
  if ndim == 5:  # DHWIO 3-D conv kernels.
    return (0, 1, 2, 3)
  raise ValueError(f'AGC has no unit-wise norm for parameter shape {shape}.')


def gradient_statistics(
  grads: PyTree,
  params: PyTree,
  clipping: Optional[float] = None,
  eps: float = 1e-3,
  mask: Optional[Mask] = None,
) -> dict:
  """The step's gradient metrics from one set of unit-wise sums of squares.

  Returns ``grad_norm`` and ``param_norm`` (global L2 norms over every leaf of
  ``grads`` and ``params``) and, unless ``clipping`` is None, ``agc_clip_fraction``
  (:func:`agc_clip_fraction`, over the leaves ``mask`` selects).

  Every leaf is reduced per AGC unit (:func:`_unit_reduction_axes`) and the global
  norms add those sums up. These are the reductions AGC itself takes, so in a step
  that also clips, XLA computes each of them once for both (common subexpressions),
  instead of reading each gradient and parameter again for each metric.

  Returns:
    A dict of float32 scalars.
  """
  if mask is None:
    mask = jax.tree.map(lambda _: True, params)
  elif callable(mask):
    mask = mask(params)
  mask_leaves, treedef = jax.tree.flatten(mask)
  # flatten_up_to checks that grads and params have the mask's structure.
  grad_leaves = treedef.flatten_up_to(grads)
  param_leaves = treedef.flatten_up_to(params)

  grad_sq = param_sq = clipped = jnp.zeros((), jnp.float32)
  total = 0  # Static: the number of units only depends on shapes.
  for m, g, p in zip(mask_leaves, grad_leaves, param_leaves):
    p = jnp.asarray(p, jnp.float32)
    g = jnp.asarray(g, jnp.float32)
    axes = _unit_reduction_axes(p.shape)
    g_unit = jnp.sum(jnp.square(g), axis=axes)
    p_unit = jnp.sum(jnp.square(p), axis=axes)
    if clipping is not None and m:
      max_norm = clipping * jnp.maximum(jnp.sqrt(p_unit), eps)
      clipped = clipped + jnp.sum(jnp.sqrt(g_unit) > max_norm).astype(jnp.float32)
      total += int(p_unit.size)
    # Without the barrier XLA's simplifier folds sum(sum(x**2, axes)) into one
    # reduction of the whole leaf; the squares, now read by two reductions, are
    # then written out in full and read twice (about 0.1 s per F0 step on CPU).
    g_unit, p_unit = jax.lax.optimization_barrier((g_unit, p_unit))
    grad_sq = grad_sq + jnp.sum(g_unit)
    param_sq = param_sq + jnp.sum(p_unit)
  stats = {'grad_norm': jnp.sqrt(grad_sq), 'param_norm': jnp.sqrt(param_sq)}
  if clipping is not None:
    stats['agc_clip_fraction'] = clipped / max(total, 1)
  return stats


def agc_clip_fraction(
  grads: PyTree,
  params: PyTree,
  clipping: float,
  eps: float = 1e-3,
  mask: Optional[Mask] = None,
) -> jax.Array:
  """Fraction of AGC units whose gradient would be clipped (a training metric).

  Counts units (see :func:`adaptive_grad_clip`) with
  ``||G_i|| > clipping * max(||W_i||, eps)``, over all parameters selected by
  ``mask`` (all parameters when ``None``), and divides by the number of units
  in those parameters.  Each unit counts once whatever its size.

  Args:
    grads: gradient pytree (same structure as ``params``).
    params: parameter pytree.
    clipping: AGC clipping threshold.
    eps: AGC parameter-norm floor.
    mask: pytree of bools with the params' structure, a callable returning one
      (e.g. :func:`agc_mask`), or ``None`` for every parameter.

  Returns:
    A float32 scalar in [0, 1] (0 when no parameter is selected).
  """
  return gradient_statistics(grads, params, clipping, eps, mask)['agc_clip_fraction']


def update_norm(updates: PyTree) -> jax.Array:
  """L2 norm of the optimizer's update tree (``optax.apply_updates`` adds it to the
  parameters), in float32.

  Taken from the updates rather than as ``||new - old||``: the step updates its
  parameters in place, so the difference would need a full copy of the old ones first,
  about twice the cost (XLA's CPU backend: 0.11 s against 0.06 s per F0 step).
  """
  return global_norm(jax.tree.map(lambda u: jnp.asarray(u, jnp.float32), updates))


# ---------------------------------------------------------------------------
# Parameter groups from Haiku names.
# ---------------------------------------------------------------------------


def is_classifier(module_path: str) -> bool:
  """Whether ``module_path`` is the classifier ``hk.Linear`` of a model.

  The classifier is the ``linear`` module that is a *direct* child of the top
  module: ``'NFNet/~/linear'``, ``'NF_ResNet/~/linear'``, ``'NF_RegNet/~/linear'``.
  Squeeze-excite linears (``'.../squeeze_excite/~/linear'``, ``'..._1'``) are
  deeper in the tree and are not the classifier.
  """
  parts = module_path.split(_SUBMODULE_SEP)
  return len(parts) == 2 and parts[1] == 'linear'


def _map_with_names(fn: Callable[[str, str], bool], params: PyTree) -> PyTree:
  """Maps ``fn(module_path, param_name)`` over a Haiku params tree."""

  def leaf_fn(path, _):
    keys = [getattr(k, 'key', getattr(k, 'name', k)) for k in path]
    name = str(keys[-1]) if keys else ''
    module = str(keys[-2]) if len(keys) >= 2 else ''
    return fn(module, name)

  return jax.tree_util.tree_map_with_path(leaf_fn, params)


def agc_mask(params: PyTree) -> PyTree:
  """Which parameters AGC clips: all but the classifier weight.

  The paper (section 4.1, "we do not clip the final linear layer") leaves the
  classifier weight ``w`` unclipped; the classifier bias *is* clipped.

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """
  return _map_with_names(lambda module, name: not (is_classifier(module) and name == 'w'), params)


def weight_decay_mask(params: PyTree) -> PyTree:
  """Which parameters receive weight decay: weights only.

  ``False`` for gains and biases of the weight-standardised convs (``gain``,
  ``bias``), every linear bias (``b``: squeeze-excite and classifier) and
  ``skip_gain``; ``True`` for every weight (``w``), the classifier's included.

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """
  return _map_with_names(lambda module, name: name not in NO_WEIGHT_DECAY_PARAMS, params)


def batch_norm_free_mask(params: PyTree) -> PyTree:
  """Every parameter but batch norm's ``scale`` and ``offset``: what the TF TPU
  EfficientNet's L2 loss covers (its ``'batch_normalization' not in v.name``)."""
  return _map_with_names(lambda module, name: name not in BATCH_NORM_PARAMS, params)


# ---------------------------------------------------------------------------
# The published optimiser.
# ---------------------------------------------------------------------------


def sgd_agc(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.9,
  nesterov: bool = True,
  weight_decay: float = 2e-5,
  clipping: Optional[float] = 0.01,
  eps: float = 1e-3,
) -> optax.GradientTransformation:
  """SGD with Nesterov momentum, coupled weight decay and AGC (the NFNet recipe).

  Per parameter, in this order (arXiv 2102.06171 section 3 and appendix C):

  1. AGC (:func:`adaptive_grad_clip`) on every parameter except the
     classifier weight (:func:`agc_mask`); skipped when ``clipping`` is None
     or 0 (e.g. for the batch-normalised baselines).
  2. Coupled weight decay ``g <- g + weight_decay * param`` on weights only
     (:func:`weight_decay_mask`).  Coupled means it is added to the gradient
     *after* clipping and then goes through momentum, as in the paper.
  3. Nesterov momentum (``optax.trace``): ``v <- momentum * v + g``;
     update ``g + momentum * v`` (plain ``v`` when ``nesterov=False``).
  4. Scale by ``-learning_rate`` (a float or an optax schedule of the step).

  AGC should see the gradient already averaged over devices: call this on the
  reduced gradient.

  Args:
    learning_rate: float or schedule ``step -> lr`` (see
      :func:`warmup_cosine_schedule`).
    momentum: momentum coefficient.
    nesterov: whether to use Nesterov momentum.
    weight_decay: coupled L2 coefficient.
    clipping: AGC threshold, or None/0 to disable AGC.
    eps: AGC parameter-norm floor.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.
  """
  transforms = []
  if clipping:
    # Masks are computed from the tree's names at trace time, so they are
    # static under jit; optax.masked calls them on the updates, which carry
    # the same names as the params.
    transforms.append(adaptive_grad_clip(clipping, eps, mask=agc_mask))
  if weight_decay:
    transforms.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
  if momentum:
    transforms.append(optax.trace(decay=momentum, nesterov=nesterov))
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*transforms)


# ---------------------------------------------------------------------------
# Learning-rate schedule.
# ---------------------------------------------------------------------------


def warmup_cosine_schedule(
  base_lr: float,
  batch_size: int,
  total_steps: int,
  warmup_steps: int,
  scale_by_batch: bool = True,
  end_lr: float = 0.0,
) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to ``end_lr`` (arXiv 2102.06171 section 3: 0).

  The peak learning rate is ``base_lr * batch_size / 256`` when
  ``scale_by_batch`` (the linear scaling rule: 0.1 x 4096 / 256 = 1.6 in the
  published recipe), else ``base_lr``.  It is reached at ``warmup_steps``;
  the cosine ``end + (peak - end) (1 + cos(pi t)) / 2`` then reaches ``end_lr``
  at ``total_steps`` and stays there.  (NFNets decay to 0; the released
  NF-RegNet experiment ends at 0.001.)

  Args:
    base_lr: learning rate per 256 examples (or the peak, if not scaling).
    batch_size: global batch size.
    total_steps: length of the whole schedule, warmup included.
    warmup_steps: length of the linear warmup (0 for none).
    scale_by_batch: apply the ``batch_size / 256`` scaling.
    end_lr: the final learning rate (absolute, never scaled by the batch).

  Returns:
    An optax schedule ``step -> lr`` (jit-friendly).
  """
  if total_steps <= 0:
    raise ValueError(f'total_steps must be positive, got {total_steps}.')
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'Need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}.')
  peak = base_lr * batch_size / 256 if scale_by_batch else base_lr
  if not 0.0 <= end_lr <= peak:
    raise ValueError(f'Need 0 <= end_lr <= the peak learning rate {peak}, got {end_lr}.')
  # optax's decay_steps is the total length including the warmup.
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=end_lr,
  )


def rmsprop_tf(
  learning_rate: optax.ScalarOrSchedule,
  decay: float = 0.9,
  momentum: float = 0.9,
  eps: float = 1e-3,
  weight_decay: float = 1e-5,
  clipping: Optional[float] = None,
  agc_eps: float = 1e-3,
) -> optax.GradientTransformation:
  """TF1's ``tf.train.RMSPropOptimizer(lr, decay, momentum, epsilon)`` with the L2 loss
  of the TF TPU EfficientNet (models/official/efficientnet: main.py, utils.py).

  Per parameter: optional AGC (as in :func:`sgd_agc`); ``g <- g + weight_decay * p`` on
  every parameter but batch norm's (:func:`batch_norm_free_mask`; TF adds
  ``weight_decay * sum(l2_loss(v))`` to the loss, whose gradient this is); then TF1's
  RMSProp, which is ``optax.rmsprop`` with the mean square starting at 1
  (``initial_scale=1``, TF's ``ones`` slot), ``eps`` inside the square root, and the
  learning rate inside the momentum buffer::

    ms <- decay * ms + (1 - decay) * g^2;  mom <- momentum * mom + lr * g / sqrt(ms + eps)
    param <- param - mom
  """
  transforms = []
  if clipping:
    transforms.append(adaptive_grad_clip(clipping, agc_eps, mask=agc_mask))
  if weight_decay:
    transforms.append(optax.add_decayed_weights(weight_decay, mask=batch_norm_free_mask))
  transforms.append(
    optax.rmsprop(
      learning_rate,
      decay=decay,
      eps=eps,
      initial_scale=1.0,
      eps_in_sqrt=True,
      momentum=momentum or None,
    )
  )
  return optax.chain(*transforms)


def warmup_exponential_schedule(
  base_lr: float,
  batch_size: int,
  warmup_steps: int,
  decay_steps: float,
  decay_rate: float,
  scale_by_batch: bool = True,
) -> optax.Schedule:
  """The TF TPU EfficientNet's schedule (utils.build_learning_rate, 'exponential'):
  ``peak * decay_rate ** floor(step / decay_steps)`` (staircase, counted from step 0),
  and before ``warmup_steps`` the linear warmup ``peak * step / warmup_steps`` in its
  place. ``peak = base_lr * batch_size / 256`` when ``scale_by_batch``. ``decay_steps``
  may be fractional (TF's 2.4 epochs of steps)."""
  if decay_steps <= 0:
    raise ValueError(f'decay_steps must be positive, got {decay_steps}.')
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}.')
  peak = base_lr * batch_size / 256 if scale_by_batch else base_lr

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    decayed = peak * jnp.float32(decay_rate) ** jnp.floor(step / jnp.float32(decay_steps))
    if not warmup_steps:
      return decayed
    return jnp.where(step < warmup_steps, peak * step / warmup_steps, decayed)

  return schedule


# ---------------------------------------------------------------------------
# Exponential moving average of the parameters.
# ---------------------------------------------------------------------------


def ema_decay(step, max_decay: float = 0.99999) -> jax.Array:
  """EMA decay ``min(max_decay, (1 + step) / (10 + step))`` (arXiv 2102.06171 appendix C).

  The step-dependent warm-up makes early EMA values track the fast-moving
  parameters instead of staying near the initialisation.  ``step`` may be a
  Python int or a (traced) integer array.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(max_decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_params: PyTree, params: PyTree, step, max_decay: float = 0.99999) -> PyTree:
  """One EMA step: ``ema * d + params * (1 - d)`` with ``d = ema_decay(step)``.

  Pure and jit-friendly (``step`` may be traced).  Leaves keep the dtype of
  ``ema_params``; non-floating leaves are taken from ``params``.
  """
  d = ema_decay(step, max_decay)

  def update(e, p):
    e = jnp.asarray(e)
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      return p
    # Blend in at least float32 so bf16 copies do not lose the tiny (1 - d).
    ct = jnp.promote_types(e.dtype, jnp.float32)
    dc = d.astype(ct)
    new = e.astype(ct) * dc + jnp.asarray(p).astype(ct) * (1 - dc)
    return new.astype(e.dtype)

  return jax.tree.map(update, ema_params, params)
