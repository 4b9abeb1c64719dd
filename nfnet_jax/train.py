r"""Training and evaluation: the loop around the per-device steps of steps.py.

    python -m nfnet_jax.train --config experiments/digits.py --workdir /tmp/digits
    python -m nfnet_jax.train --config experiments/nfnet.py:F0 --workdir gs://b/f0 \
        --config.train.batch_size=4096
    python -m nfnet_jax.train --config experiments/digits.py --workdir /tmp/digits --mode eval

The file reads top to bottom: the optimizer, evaluation of a split, the setup
shared by training and evaluation, the training loop in its stages (build data, build
model and optimizer, restore, loop: step, log, evaluate, save; final evaluation and
export), evaluation on its own, and the command line.
"""

import dataclasses
import sys
import time
from typing import Any, Optional, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from nfnet_jax import checkpoint as checkpoint_lib
from nfnet_jax import cli, data, models, optim, parallel, steps
from nfnet_jax import metrics as metrics_lib
from nfnet_jax import weights as weights_lib


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss, gradient or parameter."""


# ---------------------------------------------------------------------------
# Durations and the optimizer.
# ---------------------------------------------------------------------------
def total_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """`train.num_steps` if set, else `train.num_epochs` of the training split.

  Partial last steps are dropped, as in the paper (360 ImageNet epochs at batch
  4096 = 112,602 steps).
  """
  if config.train.num_steps:
    return int(config.train.num_steps)
  return max(1, int(config.train.num_epochs * num_train_examples // config.train.batch_size))


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: float
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  opt = config.optimizer
  if opt.name != 'sgd_agc':
    raise ValueError(f'Unknown optimizer {opt.name!r}; valid: sgd_agc.')
  warmup_steps = min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps - 1)
  schedule = optim.warmup_cosine_schedule(
    opt.base_lr,
    config.train.batch_size,
    total_steps,
    warmup_steps,
    scale_by_batch=opt.scale_by_batch,
    end_lr=opt.end_lr,
  )
  tx = optim.sgd_agc(
    schedule,
    momentum=opt.momentum,
    nesterov=opt.nesterov,
    weight_decay=opt.weight_decay,
    clipping=opt.clipping,
    eps=opt.eps,
  )
  return tx, schedule


# ---------------------------------------------------------------------------
# Evaluation over a whole split.
# ---------------------------------------------------------------------------
def evaluate_split(
  p_eval_step,
  state: steps.TrainState,
  config: ml_collections.ConfigDict,
  split: str,
  devices: Sequence,
) -> dict[str, float]:
  num_devices = len(devices)
  per_device = parallel.per_device_batch_size(config.eval.batch_size, num_devices)
  totals = None
  for batch in parallel.prefetch_to_devices(
    data.eval_iterator(
      config.data,
      split=split,
      per_device_batch=per_device,
      local_devices=num_devices,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    devices,
  ):
    sums = p_eval_step(state.params, state.ema_params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.to_host(totals)
  count = float(totals.pop('count'))
  results = {f'eval_{k}': float(v) / count for k, v in totals.items()}
  results['eval_count'] = int(count)
  return results


# ---------------------------------------------------------------------------
# Setup shared by training and evaluation.
# ---------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Catches config mistakes before anything expensive (or irreversible) runs."""
  models.mixed_precision_policy(config.dtype)
  models.model_variant(config.model)
  if config.train.batch_size < 1 or config.eval.batch_size < 1:
    raise ValueError('train.batch_size and eval.batch_size must be positive.')
  if not config.train.num_steps and not config.train.num_epochs:
    raise ValueError('Set train.num_epochs or train.num_steps.')
  for key in ('log_every_steps', 'eval_every_steps'):
    if config.train[key] < 1:
      raise ValueError(f'train.{key} must be >= 1, got {config.train[key]}.')


@dataclasses.dataclass
class Setup:
  """What training and evaluation build before their first step."""

  info: data.DatasetInfo
  devices: list
  model: Any  # hk.Transformed
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  checkpointer: Optional[checkpoint_lib.Checkpointer]
  state: steps.TrainState  # freshly initialised, replicated over `devices`


def setup(
  config: ml_collections.ConfigDict, workdir: str, *, training: bool, checkpoints: bool = True
) -> Setup:
  validate_config(config)
  info = data.dataset_info(config.data)
  # Before anything is written: a workdir trained on other classes is refused untouched.
  checkpoint_lib.check_and_write_class_index(
    info.name, info.class_names, workdir, write=training and jax.process_index() == 0
  )
  devices = parallel.local_devices(config.num_devices)
  model = models.build_model(config.model, info.num_classes, config.dtype)
  num_train = data.split_size(config.data, data.train_split(config.data))
  total_steps = total_train_steps(config, num_train)
  optimizer, schedule = make_optimizer(config, total_steps, num_train / config.train.batch_size)
  checkpointer = (
    checkpoint_lib.Checkpointer(
      workdir,
      model_signature=models.model_signature(config.model, info.num_classes),
      max_to_keep=config.checkpoint.max_to_keep,
      save_interval_steps=config.checkpoint.every_steps,
    )
    if checkpoints
    else None
  )
  state = steps.init_state(
    jax.random.PRNGKey(config.seed), model, optimizer, config.data.image_size
  )
  # Restore keeps this layout, so restored and fresh states are laid out alike.
  return Setup(
    info=info,
    devices=devices,
    model=model,
    optimizer=optimizer,
    schedule=schedule,
    total_steps=total_steps,
    checkpointer=checkpointer,
    state=parallel.replicate(state, devices),
  )


def restore(checkpointer: checkpoint_lib.Checkpointer, state: steps.TrainState) -> steps.TrainState:
  """The newest checkpoint, in `state`'s layout (the checkpoint holds its fields)."""
  return steps.TrainState(**checkpointer.restore(state._asdict()))


def check_finite(
  metrics: dict, step: int, checkpointer: checkpoint_lib.Checkpointer, workdir: str
) -> None:
  bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(v))}
  if bad:
    last = checkpointer.latest_step()
    kept = (
      f'The last good checkpoint (step {last}) in {workdir}/checkpoints is kept '
      'and nothing after it was saved.'
      if last is not None
      else 'No checkpoint had been saved yet.'
    )
    raise NonFiniteLossError(
      f'Training diverged at step {step}: non-finite {bad}. {kept} Lower the '
      'learning rate (--config.optimizer.base_lr), keep AGC on '
      '(--config.optimizer.clipping), or check the input data.'
    )


# ---------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, progress_bar: bool = True
) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in `workdir`) and evaluates.

  Returns the final evaluation metrics.
  """
  # 1. Data, model, optimizer, checkpoints.
  run = setup(config, workdir, training=True)
  ckpt, devices, num_classes = run.checkpointer, run.devices, run.info.num_classes
  num_devices = len(devices)
  per_device = parallel.per_device_batch_size(config.train.batch_size, num_devices)

  # 2. Restore: a restarted run continues from its newest checkpoint; a new one may
  # start from pretrained weights (fine-tuning).
  state = run.state
  if ckpt.latest_step() is not None:
    state = parallel.replicate(restore(ckpt, state), devices)
  elif config.init_from:
    params = weights_lib.initial_params(
      config.model, config.init_from, parallel.to_host(state.params), num_classes
    )
    state = parallel.replicate(state._replace(params=params, ema_params=params), devices)
  start_step = int(state.step)

  # A resumed run draws a fresh shuffle rather than replaying the first batches.
  train_iter = parallel.prefetch_to_devices(
    data.train_iterator(
      config.data,
      per_device_batch=per_device,
      local_devices=num_devices,
      seed=config.seed + start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    devices,
  )
  p_train_step = parallel.map_train_step(
    steps.make_train_step(run.model, run.optimizer, run.schedule, config, num_classes), devices
  )
  p_eval_step = parallel.map_eval_step(steps.make_eval_step(run.model, num_classes), devices)
  logger = metrics_lib.MetricsLogger(
    workdir, total_steps=run.total_steps, progress_bar=progress_bar
  )
  if start_step == 0:
    logger.write(
      0,
      {
        'num_params': models.count_params(state.params),
        'num_devices': num_devices * jax.process_count(),
        'total_steps': run.total_steps,
      },
    )

  # 3. The loop.
  eval_metrics, shown = {}, {}
  try:
    timer_step, timer_start = start_step, time.perf_counter()
    for step in range(start_step + 1, run.total_steps + 1):
      state, metrics = p_train_step(state, next(train_iter))

      is_last = step == run.total_steps
      # The one place that decides to save (the interval, a preemption notice or the
      # end); every process reaches the same decision (Orbax coordinates the hosts).
      saving = ckpt.should_save(step) or is_last
      if step % config.train.log_every_steps == 0 or saving or step == start_step + 1:
        metrics = parallel.to_host(metrics)
        # Never save a diverged state: the check runs before every save.
        check_finite(metrics, step, ckpt, workdir)
        now = time.perf_counter()
        images_per_sec = (
          (step - timer_step) * config.train.batch_size / max(now - timer_start, 1e-9)
        )
        timer_step, timer_start = step, now
        scalars = {k: float(v) for k, v in metrics.items()}
        if step > start_step + 1:  # the first step's time is compilation
          scalars['images_per_sec'] = images_per_sec
        logger.write(step, scalars)
        shown = {'loss': scalars['loss'], 'top1': scalars['top1']}
        if 'images_per_sec' in scalars:
          shown['img/s'] = images_per_sec
      logger.progress(step, **shown)

      if step % config.train.eval_every_steps == 0 or is_last:
        eval_metrics = evaluate_split(p_eval_step, state, config, config.eval.split, devices)
        logger.write(step, eval_metrics)
        timer_step, timer_start = step, time.perf_counter()

      if saving:
        ckpt.save(step, state._asdict())

    # 4. Final evaluation (when resumed at the very end) and export.
    if not eval_metrics:
      eval_metrics = evaluate_split(p_eval_step, state, config, config.eval.split, devices)
      logger.write(int(state.step), eval_metrics)
    weights_lib.export_params(config.model, parallel.to_host(state.ema_params), workdir)
  finally:
    ckpt.close()
    logger.close()
  return eval_metrics


# ---------------------------------------------------------------------------
# Evaluation on its own.
# ---------------------------------------------------------------------------
def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  split: Optional[str] = None,
  weights: Optional[str] = None,
) -> dict[str, float]:
  """Evaluates the newest checkpoint in `workdir` (raw and EMA parameters), or the
  parameters in a `weights` file (released or converted .npz; raw = EMA = the file's)."""
  run = setup(config, workdir, training=False, checkpoints=not weights)
  state = run.state
  if weights:  # no checkpoint involved: nothing but metrics is written to workdir
    params = weights_lib.load_for_model(config.model, weights, run.info.num_classes)
    state = state._replace(params=params, ema_params=params)
  else:
    try:
      if run.checkpointer.latest_step() is None:
        raise FileNotFoundError(
          f'No checkpoint in {workdir}/checkpoints to evaluate. Train first '
          f'(python -m nfnet_jax.train --config ... --workdir {workdir}) or point '
          '--workdir at a training run.'
        )
      state = restore(run.checkpointer, state)
    finally:
      run.checkpointer.close()
  state = parallel.replicate(state, run.devices)
  p_eval_step = parallel.map_eval_step(
    steps.make_eval_step(run.model, run.info.num_classes), run.devices
  )
  results = evaluate_split(p_eval_step, state, config, split or config.eval.split, run.devices)
  with metrics_lib.MetricsLogger(
    workdir, total_steps=run.total_steps, progress_bar=False
  ) as logger:
    logger.write(int(state.step), results)
  return results


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
def initialize_distributed(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
) -> None:
  """Joins a multi-process job; must run on every host before any other JAX call.

  On Cloud TPU VMs the arguments are discovered automatically. Elsewhere (and
  to rehearse a pod on one machine with CPU processes) pass all three.
  """
  kwargs = {}
  if coordinator_address:
    kwargs = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  jax.distributed.initialize(**kwargs)


def define_flags(values: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config file, e.g. experiments/digits.py or '
    'experiments/nfnet.py:F0; override fields with --config.train.batch_size=...',
    lock_config=True,
    flag_values=values,
  )
  flags.DEFINE_string(
    'workdir',
    None,
    'Directory for checkpoints and logs (local, or gs://... shared by all hosts).',
    flag_values=values,
  )
  flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval'],
    'train (resumes automatically) or eval (newest checkpoint).',
    flag_values=values,
  )
  flags.DEFINE_string(
    'weights',
    None,
    'With --mode eval: evaluate this weights file '
    "(DeepMind's F{k}_haiku.npz or a converted .npz) instead of the "
    'newest checkpoint.',
    flag_values=values,
  )
  flags.DEFINE_bool(
    'distributed',
    False,
    'Multi-host job (e.g. a TPU pod slice): call '
    'jax.distributed.initialize() first. Start the same command on '
    'every host.',
    flag_values=values,
  )
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0, for multi-process jobs outside Cloud TPU (implies --distributed).',
    flag_values=values,
  )
  flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.', flag_values=values)
  flags.DEFINE_integer('process_id', None, 'With --coordinator_address.', flag_values=values)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=values)


def main(argv) -> None:
  del argv
  flags_ = flags.FLAGS
  # Orbax narrates every save at INFO; keep the console for the progress bar.
  if not flags_['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if flags_.distributed or flags_.coordinator_address:
    initialize_distributed(flags_.coordinator_address, flags_.num_processes, flags_.process_id)
  config = flags_.config
  if flags_.mode == 'train':
    results = train_and_evaluate(config, flags_.workdir)
  else:
    results = evaluate(config, flags_.workdir, weights=flags_.weights)
  if jax.process_index() == 0:
    print(
      ' '.join(
        f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in sorted(results.items())
      )
    )


def run_main():
  # absl's app (not cli.run): it sets up absl logging, which the multi-host start-up
  # and Orbax report through.
  argv = cli.normalize_argv(sys.argv)
  if cli.wants_help(argv):  # this tool's flags, not every absl module's
    values = flags.FlagValues()
    define_flags(values)
    print(cli.usage(__doc__, values))
    return
  define_flags(flags.FLAGS)
  app.run(main, argv=argv)


if __name__ == '__main__':
  run_main()
