"""The per-device steps: pure functions of (state, batch) that reduce over the device axis.

`parallel.py` maps them over devices; `train.py` runs them in its loop. Nothing here
knows how many devices there are: each step sees one device's share of the batch, and the
only values that cross devices are the gradients and the metrics (NFNets have no batch
norm, arXiv 2102.06171 section 1) and, for the batch-normalised baselines, their batch
statistics and moving averages.

Every model runs as `hk.transform_with_state`: the baselines keep batch norm's moving
averages as Haiku state, and a stateless model (`hk.Transformed`, the NF families) is
wrapped by `hk.with_empty_state`, whose state is `{}`: no leaves, so nothing is traced for
it and the NF families' steps compute exactly what they computed without state.
"""

from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnet_jax import data, distill, fused_sgd, losses, optim, parallel, sam

AXIS = parallel.AXIS


class TrainState(NamedTuple):
  """Everything a step changes; checkpointed as a dict of these fields (the two model
  states only when not empty, see `train.checkpoint_tree`)."""

  step: jax.Array  # int32 scalar: steps taken
  params: Any  # Haiku parameter tree (float32)
  opt_state: Any  # optax state of `make_optimizer`'s transformation
  ema_params: Any  # EMA of params, evaluated beside them
  rng: jax.Array  # the run's key; each step folds in the step and the device
  # Haiku state: batch norm's moving mean and variance (float32); {} for the NF families.
  model_state: Any = {}  # noqa: B006 - never mutated: the steps return new trees
  # Its EMA, evaluated with ema_params, as DeepMind's released experiment.py keeps
  # `ema_states` beside `ema_params` (and the TF EfficientNet averages its moving
  # statistics with its weights).
  ema_model_state: Any = {}  # noqa: B006


def with_state(model) -> hk.TransformedWithState:
  """`model` as `hk.transform_with_state` gives it; a stateless `hk.Transformed` (or any
  object with its `init`/`apply`) is wrapped as `hk.with_empty_state` does: its state is
  `{}`, and its init and apply compute what they did."""
  if isinstance(model, hk.TransformedWithState):
    return model

  def init(*args, **kwargs):
    return model.init(*args, **kwargs), {}

  def apply(params, state, *args, **kwargs):
    del state  # always {}
    return model.apply(params, *args, **kwargs), {}

  return hk.TransformedWithState(init, apply)


def init_state(rng: jax.Array, model, optimizer, image_size: int) -> TrainState:
  """A fresh state; `model` is `hk.transform`ed or `hk.transform_with_state`ed."""
  model = with_state(model)
  params_rng, state_rng = jax.random.split(rng)

  @jax.jit
  def _init(params_rng):
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params, model_state = model.init(params_rng, dummy, is_training=True)
    return params, model_state, optimizer.init(params)

  params, model_state, opt_state = _init(params_rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=opt_state,
    ema_params=jax.tree.map(jnp.copy, params),
    rng=state_rng,
    model_state=model_state,
    ema_model_state=jax.tree.map(jnp.copy, model_state),
  )


# ---------------------------------------------------------------------------
# The per-device steps: pure functions, reduced over the AXIS device axis.
# ---------------------------------------------------------------------------
def model_inputs(images: jax.Array) -> jax.Array:
  """uint8 pixels (training batches) -> float32 normalised with the ImageNet mean/std,
  on the device; float batches (evaluation) arrive normalised and pass through."""
  if images.dtype != jnp.uint8:
    return images
  mean = jnp.asarray(data.MEAN_RGB, jnp.float32)
  std = jnp.asarray(data.STDDEV_RGB, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def _split_micro_batches(x: jax.Array, accum_steps: int) -> jax.Array:
  """[per_device, ...] -> [accum_steps, per_device // accum_steps, ...], in order."""
  return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])


def make_train_step(
  model, optimizer, schedule, config: ml_collections.ConfigDict, num_classes: int, teacher=None
):
  """The per-device train step `(state, batch) -> (state, metrics)`; with a `teacher`
  (the `hk.Transformed` of `distill.load_teacher`), `(state, batch, teacher_params) ->
  (state, metrics)`.

  With a teacher (knowledge distillation, `config.distill`), the loss is
  `losses.distillation_cross_entropy` of the student's logits, the teacher's and the
  labels: the teacher sees the very images the student sees (mixed by MixUp/CutMix in the
  input pipeline, so its soft targets and the mixed labels describe the same pixels), in
  evaluation mode, in the model's compute dtype, without gradient (`distill.teacher_logits`),
  once per (micro-)batch. Under SAM the ascent pass takes the same loss on its first
  examples, with those examples' teacher logits. Without a teacher none of it is traced.

  With `config.train.grad_accum_steps = K > 1`, each device's batch is split into K
  micro-batches that run one after another (a `lax.scan`, so activations of one
  micro-batch at a time are live): their float32 gradients, losses and top-1 are summed
  and divided by K, which is the mean over the whole batch since the micro-batches are
  equal in size. The cross-device mean, AGC and the optimizer then run once, on that
  gradient, exactly as for one pass over the batch: AGC clips the global-batch gradient
  (arXiv 2102.06171 section 4), so accumulating clipped micro-batch gradients would
  be a different algorithm.

  With `config.optimizer.sam_rho > 0`, each (micro-)batch's gradient is SAM's
  (`sam.sam_value_and_grad`, arXiv 2102.06171 appendix A.4): the ascent gradient of its
  first `sam_ascent_fraction` of examples (their MixUp/CutMix soft labels included)
  perturbs the parameters on this device only, and the loss and gradient of the whole
  (micro-)batch are taken there (the logged loss and top-1 are this pass's); only these
  descent gradients cross devices (the pmean below), then AGC and the optimizer run at
  the unperturbed parameters as before. The ascent reuses the step's rng key: with JAX's
  partitionable threefry (the default) the first examples then draw the very
  stochastic-depth and dropout masks in the ascent that they draw in the descent, so the
  perturbation is computed on the sub-networks the descent differentiates. With gradient
  accumulation each micro-batch takes its own ascent, as each device does (the paper
  mimics devices with accumulation). `sam_rho = 0` traces none of it.

  Model state (batch norm's moving averages; `{}` for the NF families, which then trace
  nothing of what follows): each forward pass in training mode returns the state updated
  with its batch statistics. Micro-batches thread it through the scan, one update each, as
  K consecutive training batches would. Under SAM only the descent pass's update is kept:
  the ascent runs from the same incoming state and its update is discarded, so the moving
  averages advance once per (micro-)batch. The updated state is then averaged over the
  devices (`lax.pmean`), as Flax's ImageNet example and big_vision sync batch statistics:
  the state is replicated (`P()` under shard_map, un-stacked under pmap, neither checked),
  so with per-device statistics (`bn_sync='none'`) each device would otherwise hold
  different moving averages under one "replicated" array, and what is checkpointed and
  evaluated would depend on the device read. The mean of the devices' moving means is the
  moving average of the global batch mean; the variances average the per-device ones.
  With `bn_sync='all'` the devices' states are already equal and the mean changes nothing.
  The EMA of the state follows `ema_params` with the same decay.

  With `config.optimizer.name = 'sgd_agc'` on a CPU backend, the optimizer, the update to
  the parameters and their EMA run as one native pass (`fused_sgd`; same arithmetic and
  state as `optimizer`, which must then be `train.make_optimizer`'s); elsewhere as the
  optax chain.
  """
  clipping = config.optimizer.clipping
  fused_update = None
  if config.optimizer.name == 'sgd_agc':
    fused_update = fused_sgd.make_update(
      fused_sgd.Hyperparams.from_config(config.optimizer), schedule, config.ema_max_decay
    )
  sam_rho = float(config.optimizer.get('sam_rho', 0.0))
  sam_fraction = float(config.optimizer.get('sam_ascent_fraction', 0.2))
  if sam_rho:
    sam.check_sam_args(sam_rho, sam_fraction)
  accum_steps = int(config.train.get('grad_accum_steps', 1))
  if accum_steps < 1:
    raise ValueError(f'config.train.grad_accum_steps must be >= 1; got {accum_steps}.')

  model = with_state(model)
  if teacher is not None:
    distill_weight = float(config.distill.weight)
    temperature = float(config.distill.temperature)

  def example_losses(logits, targets):
    """Per-example losses; `targets` is the labels, or (labels, teacher logits)."""
    if teacher is None:
      return losses.softmax_cross_entropy(logits, targets, num_classes, config.label_smoothing)
    labels, teacher_logits = targets
    return losses.distillation_cross_entropy(
      logits,
      teacher_logits,
      labels,
      num_classes,
      distill_weight,
      temperature,
      config.label_smoothing,
    )

  def loss_fn(params, model_state, images, targets, rng):
    outputs, model_state = model.apply(params, model_state, rng, images, is_training=True)
    logits = outputs['logits'].astype(jnp.float32)  # the loss runs in float32
    loss = jnp.mean(example_losses(logits, targets))
    return loss, (logits, model_state)

  def loss_grads_top1(params, model_state, images, labels, rng, teacher_params=None):
    """(mean loss, float32 gradient, mean top-1) of one (micro-)batch, and the model
    state its forward pass leaves."""
    inputs, targets = model_inputs(images), labels
    if teacher is not None:
      targets = (labels, distill.teacher_logits(teacher, teacher_params, inputs))
    if sam_rho:
      # Both passes start from `model_state`; the aux (and so the state) is the descent's.
      batch_loss = lambda p, batch: loss_fn(p, model_state, *batch, rng)  # noqa: E731
      (loss, (logits, model_state)), grads = sam.sam_value_and_grad(
        batch_loss, sam_rho, sam_fraction, has_aux=True
      )(params, (inputs, targets))
    else:
      (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, inputs, targets, rng
      )
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    return (loss, grads, jnp.mean(losses.topk_correct(logits, labels, 1))), model_state

  def accumulate(params, model_state, images, labels, rng, teacher_params=None):
    per_device = images.shape[0]
    if per_device % accum_steps:
      raise ValueError(
        f'The per-device batch of {per_device} examples does not split into '
        f'config.train.grad_accum_steps={accum_steps} equal micro-batches. Use a '
        f'per-device batch that is a multiple of {accum_steps} (the global batch '
        f'divided by the devices), or a grad_accum_steps that divides {per_device}.'
      )
    micro = (
      jnp.arange(accum_steps),
      _split_micro_batches(images, accum_steps),
      _split_micro_batches(labels, accum_steps),
    )

    def body(carry, xs):
      totals, model_state = carry
      index, micro_images, micro_labels = xs
      # Each micro-batch draws its own stochastic depth and dropout masks.
      out, model_state = loss_grads_top1(
        params,
        model_state,
        micro_images,
        micro_labels,
        jax.random.fold_in(rng, index),
        teacher_params,
      )
      return (jax.tree.map(jnp.add, totals, out), model_state), None

    zeros = (
      jnp.zeros((), jnp.float32),
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
      jnp.zeros((), jnp.float32),
    )
    (totals, model_state), _ = jax.lax.scan(body, (zeros, model_state), micro)
    return jax.tree.map(lambda t: t / accum_steps, totals), model_state

  def train_step(state: TrainState, batch: dict, teacher_params=None) -> tuple[TrainState, dict]:
    step, params = state.step, state.params
    # Same key on every device, then a different stream per device (and step),
    # for stochastic depth and dropout.
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, step), jax.lax.axis_index(AXIS))
    grads_of = loss_grads_top1 if accum_steps == 1 else accumulate
    (loss, grads, top1), model_state = grads_of(
      params, state.model_state, batch['images'], batch['labels'], rng, teacher_params
    )
    # Gradients are averaged across devices in float32; AGC then sees the
    # global-batch gradient, as in the paper.
    grads = parallel.pmean(grads)
    fused = fused_update and fused_update(grads, state.opt_state, params, state.ema_params, step)
    if fused:
      new_params, opt_state, ema_params, norm_of_update = fused
    else:
      updates, opt_state = optimizer.update(grads, state.opt_state, params)
      new_params = optax.apply_updates(params, updates)
      ema_params = optim.ema_update(state.ema_params, new_params, step, config.ema_max_decay)
      norm_of_update = optim.update_norm(updates)
    ema_model_state = state.ema_model_state
    if jax.tree.leaves(model_state):  # batch norm: keep the replicas' statistics equal
      model_state = parallel.pmean(model_state)
      ema_model_state = optim.ema_update(ema_model_state, model_state, step, config.ema_max_decay)
    metrics = {
      'loss': parallel.pmean(loss),
      'top1': parallel.pmean(top1),
      'learning_rate': schedule(step),
      # grad_norm, param_norm (of the parameters the gradient was taken at) and the
      # clip fraction share AGC's unit-wise sums instead of reading every leaf again.
      **optim.gradient_statistics(
        grads, params, clipping or None, config.optimizer.eps, mask=optim.agc_mask
      ),
      'update_norm': norm_of_update,
    }
    new_state = TrainState(
      step=step + 1,
      params=new_params,
      opt_state=opt_state,
      ema_params=ema_params,
      rng=state.rng,
      model_state=model_state,
      ema_model_state=ema_model_state,
    )
    return new_state, metrics

  return train_step


def make_eval_step(model, num_classes: int):
  """Sums (not means) of loss/top-1/top-5 over real examples, for raw and EMA params.

  A multi-label batch (a 'label_set', ImageNet ReaL) gives the multi-label top-1 only,
  over the examples that have at least one correct class: ReaL leaves the others out
  (Beyer et al. 2020, arXiv 2006.07159 section 4); 'count' is then their number.

  `model_states` is (model_state, ema_model_state): batch norm's moving averages that
  go with `params` and `ema_params` (evaluation normalises with them); `({}, {})` for a
  stateless model."""
  model = with_state(model)

  def eval_step(params, ema_params, batch, model_states=({}, {})):
    mask = batch['mask']
    label_sets = batch.get('label_set')
    if label_sets is not None:
      mask = mask * jnp.any(label_sets, axis=-1).astype(mask.dtype)
    sums = {'count': jnp.sum(mask)}
    for prefix, p, s in (('', params, model_states[0]), ('ema_', ema_params, model_states[1])):
      outputs, _ = model.apply(p, s, None, model_inputs(batch['images']), is_training=False)
      logits = outputs['logits']
      if label_sets is not None:
        sums[prefix + 'top1'] = jnp.sum(losses.label_set_top1_correct(logits, label_sets) * mask)
        continue
      labels = batch['labels']
      sums[prefix + 'loss'] = jnp.sum(
        losses.softmax_cross_entropy(logits, labels, num_classes) * mask
      )
      sums[prefix + 'top1'] = jnp.sum(losses.topk_correct(logits, labels, 1) * mask)
      sums[prefix + 'top5'] = jnp.sum(
        losses.topk_correct(logits, labels, min(5, num_classes)) * mask
      )
    return jax.lax.psum(sums, AXIS)

  return eval_step
