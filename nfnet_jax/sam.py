r"""Sharpness-aware minimisation (SAM) as the NFNet paper uses it.

SAM (Foret et al. 2020, arXiv 2010.01412, equations 2-3) takes the gradient of the loss at
parameters pushed uphill by `rho` along the normalised gradient,
`w + rho * g / ||g||`, instead of at `w`. The NFNet paper (arXiv 2102.06171 table 3,
"F5+SAM" and "F6+SAM", and appendix A.4) cuts its cost from +100% to +20-40% of a step by
taking the ascent gradient `g` on only 20% of the batch: a subset of the examples the
descent gradient then uses, never a different batch. On several devices each device
perturbs its own parameters with its own examples' ascent gradient (not synchronised);
only the descent gradients are averaged (`steps.make_train_step` does that).

`sam_value_and_grad` is the gradient rule alone, so it composes with any optax optimizer
exactly as AGC does: the optimizer never sees the perturbation.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from nfnet_jax import optim

# ||g|| below this counts as zero: the perturbation is then (numerically) zero and the step
# is plain gradient descent, rather than NaN from 0 / 0.
NORM_EPS = 1e-12


def ascent_size(batch_size: int, ascent_fraction: float) -> int:
  """Examples the ascent gradient is taken on: the first `max(1, int(fraction * n))`."""
  return max(1, int(ascent_fraction * batch_size))


def check_sam_args(rho: float, ascent_fraction: float) -> None:
  if not rho >= 0:
    raise ValueError(f'SAM rho must be >= 0 (0 turns SAM off); got {rho}.')
  if not 0 < ascent_fraction <= 1:
    raise ValueError(f'SAM ascent_fraction must be in (0, 1]; got {ascent_fraction}.')


def _batch_size(batch) -> int:
  sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      'SAM needs a batch whose arrays share one leading example axis; got leading sizes '
      f'{sorted(sizes, key=str)}.'
    )
  return sizes.pop()


def perturbation(grads, rho: float):
  """`rho * g / max(||g||, NORM_EPS)`, the norm global over every leaf (float32)."""
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  scale = rho / jnp.maximum(optim.global_norm(grads), NORM_EPS)
  return jax.tree.map(lambda g: g * scale, grads)


def sam_value_and_grad(
  loss_fn: Callable[..., Any], rho: float, ascent_fraction: float = 0.2, *, has_aux: bool = False
) -> Callable[[Any, Any], tuple[Any, Any]]:
  """SAM's `jax.value_and_grad`: `(params, batch) -> (loss, grads)` of the whole batch at the
  parameters perturbed by the ascent step of its first examples.

  Args:
    loss_fn: `loss_fn(params, batch)` -> the mean loss over `batch` (with `has_aux`: a
      `(loss, aux)` pair, as for `jax.value_and_grad`). `batch` is a pytree of arrays with a
      leading example axis (images, labels, MixUp/CutMix soft labels alike).
    rho: the radius of the perturbation (arXiv 2010.01412's rho); 0 gives the plain gradient
      at `params` (at the cost of the ascent pass).
    ascent_fraction: the ascent gradient `g` is taken on the first
      `max(1, int(ascent_fraction * n))` of the batch's `n` examples (arXiv 2102.06171
      appendix A.4: 0.2).
    has_aux: whether `loss_fn` returns `(loss, aux)`; `aux` comes from the descent pass.

  Returns:
    `f(params, batch) -> (loss, grads)` (`((loss, aux), grads)` with `has_aux`): the loss of
    the whole batch at `params + rho * g / ||g||` and its gradient there. `||g||` is the
    global L2 norm over all leaves; a zero `g` (`||g|| < NORM_EPS`) gives a zero
    perturbation. The perturbation is float32; `g` carries no gradient (as in SAM).

  Composes with any optax optimizer, AGC included, since only the gradient changes:

    tx = optax.chain(nfnet_jax.adaptive_grad_clip(0.01), optax.sgd(0.1, momentum=0.9))
    grad_fn = jax.jit(nfnet_jax.sam_value_and_grad(loss_fn, rho=0.05))
    loss, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)  # at the unperturbed params
    params = optax.apply_updates(params, updates)

  Under data parallelism call it on each device's batch and average `grads` afterwards
  (`lax.pmean`): each device then ascends on its own examples, as in the paper.
  """
  check_sam_args(rho, ascent_fraction)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def sam_fn(params, batch):
    m = ascent_size(_batch_size(batch), ascent_fraction)
    ascent_batch = jax.tree.map(lambda x: x[:m], batch)
    ascent_grads = jax.grad(loss_fn, has_aux=has_aux)(params, ascent_batch)
    if has_aux:
      ascent_grads, _ = ascent_grads
    eps = jax.lax.stop_gradient(perturbation(ascent_grads, rho))
    perturbed = jax.tree.map(lambda p, e: (p + e).astype(p.dtype), params, eps)
    return value_and_grad(perturbed, batch)

  return sam_fn
