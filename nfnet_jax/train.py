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

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from nfnet_jax import checkpoint as checkpoint_lib
from nfnet_jax import (
  cli,
  data,
  distill,
  fileio,
  fused_sgd,
  models,
  optim,
  parallel,
  provenance,
  steps,
)
from nfnet_jax import config as config_lib
from nfnet_jax import metrics as metrics_lib
from nfnet_jax import weights as weights_lib
from nfnet_jax import workdir as workdir_lib
from nfnet_jax.models import batchnorm


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


OPTIMIZERS = ('sgd_agc', 'rmsprop')
LR_SCHEDULES = ('cosine', 'exponential')


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: float
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) of `config.optimizer`: `name` 'sgd_agc' (the NFNet recipe) or
  'rmsprop' (the TF TPU EfficientNet's), `lr_schedule` 'cosine' or 'exponential'."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(
      f'Unknown --config.optimizer.name={opt.name!r}; valid: {", ".join(OPTIMIZERS)}.'
    )
  lr_schedule = opt.get('lr_schedule', 'cosine')
  if lr_schedule not in LR_SCHEDULES:
    raise ValueError(
      f'Unknown --config.optimizer.lr_schedule={lr_schedule!r}; valid: {", ".join(LR_SCHEDULES)}.'
    )
  warmup_steps = min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps - 1)
  if lr_schedule == 'cosine':
    schedule = optim.warmup_cosine_schedule(
      opt.base_lr,
      config.train.batch_size,
      total_steps,
      warmup_steps,
      scale_by_batch=opt.scale_by_batch,
      end_lr=opt.end_lr,
    )
  else:
    schedule = optim.warmup_exponential_schedule(
      opt.base_lr,
      config.train.batch_size,
      warmup_steps,
      opt.lr_decay_epochs * steps_per_epoch,
      opt.lr_decay_rate,
      scale_by_batch=opt.scale_by_batch,
    )
  if opt.name == 'rmsprop':
    tx = optim.rmsprop_tf(
      schedule,
      decay=opt.rms_decay,
      momentum=opt.momentum,
      eps=opt.rms_eps,
      weight_decay=opt.weight_decay,
      clipping=opt.clipping,
      agc_eps=opt.eps,
    )
    return tx, schedule
  tx = optim.sgd_agc(schedule, *fused_sgd.Hyperparams.from_config(opt))
  return tx, schedule


# ---------------------------------------------------------------------------
# Evaluation over whole splits.
# ---------------------------------------------------------------------------
def eval_metric_prefix(entries: Sequence[str], index: int) -> str:
  """The metric-name prefix of evaluation entry `index`: the first (the headline, e.g.
  validation) logs `eval_top1`, `eval_ema_top1`, `eval_count`, ...; every further one
  `eval_<entry>/top1`, ... with the entry made a TensorBoard-safe name
  (`eval_imagenet_v2/top1`, `eval_train_1pct/top1` for 'train[:1%]')."""
  if index == 0:
    return 'eval_'
  name = re.sub(r'[^0-9A-Za-z_.-]+', '_', entries[index].replace('%', 'pct')).strip('_')
  return f'eval_{name}/'


def eval_entries(spec) -> tuple[str, ...]:
  """`config.eval.splits` (comma-separated, or a sequence) -> its entries, with distinct
  metric prefixes."""
  try:
    entries = data.parse_eval_splits(spec)
  except ValueError as e:
    raise ValueError(f'{e} (set by --config.eval.splits)') from None
  prefixes = [eval_metric_prefix(entries, i) for i in range(len(entries))]
  clash = sorted({p for p in prefixes if prefixes.count(p) > 1})
  if clash:
    raise ValueError(
      f'--config.eval.splits={",".join(entries)}: entries share the metric prefix '
      f'{", ".join(clash)}; keep one of them.'
    )
  return entries


def evaluate_split(
  p_eval_step,
  state: steps.TrainState,
  config: ml_collections.ConfigDict,
  split: str,
  devices: Sequence,
  prefix: str = 'eval_',
) -> dict[str, float]:
  """Metrics of one evaluation entry (a split, or 'imagenet_v2', ...), named `prefix + k`;
  each is a mean over the entry's counted examples (`prefix + 'count'`)."""
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
    sums = p_eval_step(
      state.params, state.ema_params, batch, (state.model_state, state.ema_model_state)
    )
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.to_host(totals)
  count = float(totals.pop('count'))
  results = {f'{prefix}{k}': float(v) / count for k, v in totals.items()}
  results[f'{prefix}count'] = int(count)
  return results


def evaluate_splits(
  p_eval_step,
  state: steps.TrainState,
  config: ml_collections.ConfigDict,
  splits,
  devices: Sequence,
) -> dict[str, float]:
  """`evaluate_split` of every entry of `splits` (see `eval_entries`), in one dict."""
  entries = eval_entries(splits)
  results = {}
  for i, entry in enumerate(entries):
    prefix = eval_metric_prefix(entries, i)
    results.update(evaluate_split(p_eval_step, state, config, entry, devices, prefix))
  return results


# ---------------------------------------------------------------------------
# Setup shared by training and evaluation.
# ---------------------------------------------------------------------------
CONFIG_FILE = 'config.json'

# What a resumed run may not change: the data stream, the schedule, the optimizer and
# the loss (the model is checked by its signature). A resume that changes one of them
# splices two different runs (the learning rate jumps, the data order restarts);
# `--allow_config_change` accepts that knowingly.
RUN_DEFINING_FIELDS = (
  'seed',
  'label_smoothing',
  'ema_max_decay',
  'train.batch_size',
  'train.num_epochs',
  'train.num_steps',
  # Batch statistics over other devices are another training algorithm (not weights).
  'model.bn_sync',
  'optimizer',
  'data.name',
  'data.train_split',
  'data.image_size',
  'data.augment',
  'data.mixup_alpha',
  'data.cutmix',
  'data.randaug_layers',
  'data.randaug_magnitude',
  'data.shuffle_buffer',
  'distill',
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Catches mistakes in the config's values before anything expensive (or
  irreversible) runs; `check_run` then checks them against the devices and data."""
  models.mixed_precision_policy(config.dtype)
  fam, _, _ = models.model_variant(config.model)
  bn_sync = config.model.get('bn_sync', 'none')
  if bn_sync not in batchnorm.BN_SYNCS:
    raise ValueError(
      f'Unknown --config.model.bn_sync={bn_sync!r}; valid: {", ".join(batchnorm.BN_SYNCS)}.'
    )
  if bn_sync != 'none' and not fam.stateful:
    raise ValueError(
      f'--config.model.bn_sync={bn_sync!r} applies to batch-normalised models only; '
      f'{fam.title} has no batch norm: leave it at none.'
    )
  if config.parallel not in parallel.MODES:
    raise ValueError(
      f'Unknown --config.parallel={config.parallel!r}; use one of {", ".join(parallel.MODES)}.'
    )
  if config.train.batch_size < 1 or config.eval.batch_size < 1:
    raise ValueError(
      '--config.train.batch_size and --config.eval.batch_size must be positive, got '
      f'{config.train.batch_size} and {config.eval.batch_size}.'
    )
  if not config.train.num_steps and not config.train.num_epochs:
    raise ValueError('Set --config.train.num_epochs or --config.train.num_steps.')
  for key in ('log_every_steps', 'eval_every_steps', 'grad_accum_steps'):
    if config.train[key] < 1:
      raise ValueError(f'--config.train.{key} must be >= 1, got {config.train[key]}.')
  for key in ('every_steps', 'max_to_keep'):
    if config.checkpoint[key] < 1:
      raise ValueError(f'--config.checkpoint.{key} must be >= 1, got {config.checkpoint[key]}.')
  for key in ('start_step', 'num_steps'):
    if config.profile[key] < 0:
      raise ValueError(f'--config.profile.{key} must be >= 0, got {config.profile[key]}.')
  if not config.optimizer.sam_rho >= 0:
    raise ValueError(
      f'--config.optimizer.sam_rho must be >= 0 (0 turns SAM off), got {config.optimizer.sam_rho}.'
    )
  if not 0 < config.optimizer.sam_ascent_fraction <= 1:
    raise ValueError(
      '--config.optimizer.sam_ascent_fraction must be in (0, 1], got '
      f'{config.optimizer.sam_ascent_fraction}.'
    )
  distill.check_config(config)


def check_run(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """What the config asks of this machine and its data: batches that divide over the
  devices, splits that exist, weights that exist. Runs before the workdir is touched."""
  per_device = parallel.per_device_batch_size(config.train.batch_size, num_devices)
  parallel.per_device_batch_size(config.eval.batch_size, num_devices, '--config.eval.batch_size')
  accum = config.train.grad_accum_steps
  if per_device % accum:
    raise ValueError(
      f'--config.train.grad_accum_steps={accum} does not divide the {per_device} examples '
      f'each device gets per step (--config.train.batch_size={config.train.batch_size} over '
      f'{num_devices * jax.process_count()} devices); use a divisor of {per_device}.'
    )
  # The splits exist: an unknown evaluation split would otherwise surface at the first
  # evaluation, hours into the run.
  try:
    data.split_size(config.data, data.train_split(config.data))
  except ValueError as e:
    raise ValueError(f'{e} (set by --config.data.train_split)') from None
  for entry in eval_entries(config.eval.splits):
    try:
      data.check_eval_split(config.data, entry)
    except (ValueError, FileNotFoundError) as e:  # not prepared: FileNotFoundError
      error = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
      raise error(f'{e} (set by --config.eval.splits)') from None
  if config.init_from and not fileio.exists(config.init_from):
    raise FileNotFoundError(
      f'--config.init_from={config.init_from} does not exist; give the path of a weights '
      "file (DeepMind F{k}_haiku.npz, a converted .npz or a run's params_ema.npz)."
    )


def check_workdir(workdir: str) -> None:
  """A workdir path that cannot hold a run is refused before anything is written."""
  if fileio.is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):  # the nearest existing ancestor is where it is created
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise NotADirectoryError(
      f'--workdir {workdir}: {path} is a file, not a directory; choose another --workdir.'
    )
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(
      f'--workdir {workdir}: {path} is not writable; choose a writable --workdir.'
    )


def _flat_config(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_changes(stored: dict, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """(field, stored value, new value) for each config field that differs. A field the
  stored config lacks (written before the field existed) counts as its default in
  `config.base_config()`, which is what that run did."""
  old, new = _flat_config(stored), _flat_config(config_to_dict(config))
  old = {**_flat_config(config_to_dict(config_lib.base_config())), **old}
  missing = '<unset>'
  return [
    (key, old.get(key, missing), new.get(key, missing))
    for key in sorted(set(old) | set(new))
    if old.get(key, missing) != new.get(key, missing)
  ]


def _defines_run(field: str) -> bool:
  return any(field == f or field.startswith(f + '.') for f in RUN_DEFINING_FIELDS)


def check_resumed_config(
  config: ml_collections.ConfigDict, workdir: str, allow_change: bool = False
) -> list[str]:
  """Refuses to resume a workdir with a config that defines another run (unless
  `allow_change`); returns the changes accepted, one 'field: old -> new' line each.
  A workdir without config.json (a new one) has nothing to compare."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not fileio.exists(path):
    return []
  try:
    stored = json.loads(fileio.read_text(path))
  except ValueError as e:
    raise ValueError(
      f'{path} is not valid JSON ({e}); restore it from a backup or move it aside.'
    ) from None
  changes = config_changes(stored, config)
  defining = [(k, a, b) for k, a, b in changes if _defines_run(k)]
  if defining and not allow_change:
    raise ValueError(
      f'{workdir} holds a run whose config differs in what defines the run ('
      + '; '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in defining)
      + '). Resume it with its settings ('
      + ' '.join(f'--config.{k}={json.dumps(a)}' for k, a, _ in defining)
      + '), train in a new --workdir, or pass --allow_config_change to continue this run '
      'with the new settings.'
    )
  return [f'{k}: {a!r} -> {b!r}' for k, a, b in changes]


@dataclasses.dataclass
class Setup:
  """What training and evaluation build before their first step."""

  info: data.DatasetInfo
  devices: list
  model: Any  # hk.TransformedWithState
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  state: steps.TrainState  # freshly initialised, replicated over `devices`


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates `config` and builds what it describes; touches no workdir."""
  validate_config(config)
  devices = parallel.local_devices(config.num_devices)
  check_run(config, len(devices))
  info = data.dataset_info(config.data)
  # Every family through transform_with_state: the NF families' state is empty and their
  # steps compute what hk.transform's did (it is transform_with_state without the state).
  model = models.build_model_with_state(config.model, info.num_classes, config.dtype)
  num_train = data.split_size(config.data, data.train_split(config.data))
  total_steps = total_train_steps(config, num_train)
  optimizer, schedule = make_optimizer(config, total_steps, num_train / config.train.batch_size)
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
    state=parallel.replicate(state, devices),
  )


def make_checkpointer(
  config: ml_collections.ConfigDict, workdir: str, num_classes: int, *, read_only: bool
) -> checkpoint_lib.Checkpointer:
  return checkpoint_lib.Checkpointer(
    workdir,
    model_signature=models.model_signature(config.model, num_classes),
    max_to_keep=config.checkpoint.max_to_keep,
    save_interval_steps=config.checkpoint.every_steps,
    read_only=read_only,
  )


MODEL_STATE_FIELDS = ('model_state', 'ema_model_state')


def checkpoint_tree(state: steps.TrainState) -> dict:
  """The dict of `state`'s fields a checkpoint holds. The model states are left out
  when empty (the NF families), so their checkpoints are exactly what they were before
  the train state had model state, and checkpoints written then restore as they are."""
  tree = state._asdict()
  for field in MODEL_STATE_FIELDS:
    if not jax.tree.leaves(tree[field]):
      del tree[field]
  return tree


def restore(checkpointer: checkpoint_lib.Checkpointer, state: steps.TrainState) -> steps.TrainState:
  """The newest intact checkpoint, in `state`'s layout (the checkpoint holds its
  fields, see `checkpoint_tree`); a damaged newest one is set aside and the one before
  it restored."""
  return state._replace(**checkpointer.restore(checkpoint_tree(state)))


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


def recorded_final_eval(workdir: str, step: int) -> Optional[dict]:
  """The evaluation a finished run logged at its last `step`, if it also exported
  its weights; None if the run did not get that far."""
  path = os.path.join(workdir, metrics_lib.METRICS_FILENAME)
  if not (fileio.exists(path) and fileio.exists(os.path.join(workdir, weights_lib.EXPORT_FILE))):
    return None
  evals = [r for r in metrics_lib.read_metrics(path) if r['step'] == step and 'eval_count' in r]
  return {k: v for k, v in evals[-1].items() if k.startswith('eval_')} if evals else None


# ---------------------------------------------------------------------------
# Stopping on a signal: finish the step, save it, exit.
# ---------------------------------------------------------------------------
class TrainingStopped(Exception):
  """The run stopped early on request (SIGTERM, SIGINT) after saving its step."""

  def __init__(self, signal_name: str, step: int, workdir: str):
    self.signal_name, self.step = signal_name, step
    # The shell's convention for a process ended by a signal: 128 + its number.
    self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))
    super().__init__(
      f'stopped by {signal_name} at step {step}; the checkpoint of step {step} is saved in '
      f'{os.path.join(workdir, checkpoint_lib.CHECKPOINT_SUBDIR)}. Resume with: '
      f'{resume_command()}'
    )


def resume_command() -> str:
  """The command line that started this process, as a user would type it again."""
  argv = list(sys.argv)
  if argv and (argv[0].endswith('train.py') or argv[0] == '-m'):
    argv = ['python', '-m', 'nfnet_jax.train', *argv[1:]]
  return shlex.join(argv)


class StopRequests:
  """Catches SIGTERM (preemption, schedulers, `kill`) and SIGINT (Ctrl-C) so the loop
  can finish its step and save it; a second signal stops at once.

  In a multi-process job JAX's preemption notifier owns SIGTERM: the processes agree
  on the step to stop at through `multihost_utils.reached_preemption_sync_point`, so
  that every host saves the same step (Orbax's preemption policy reads the same
  agreement), and this class leaves SIGTERM alone there.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be installed from the main thread
    wanted = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    for sig in wanted:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None:  # asked twice: stop without waiting for the save
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    print(
      f'\nnfnet-train: received {self.signal_name}: saving a checkpoint after this step, '
      'then stopping (send it again to stop at once).',
      file=sys.stderr,
      flush=True,
    )

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


# ---------------------------------------------------------------------------
# Profiling a window of steps.
# ---------------------------------------------------------------------------
PROFILE_SUBDIR = 'profile'


class StepProfiler:
  """A `jax.profiler` trace of steps `start_step + 1 .. start_step + num_steps` (the
  trace starts from the state after `start_step` steps, so 0 includes the first step's
  compilation) into `log_dir`: `*.xplane.pb` for TensorBoard's profile tab and
  `perfetto_trace.json.gz` for Perfetto. A resumed run traces what is left of the
  window. Each step is a `StepTraceAnnotation` (TensorBoard's step view); the last
  step's outputs are waited for before the trace stops, so it holds that step's device
  work, and a loop that ends or fails early stops the trace on its way out."""

  def __init__(self, log_dir: str, start_step: int, num_steps: int, enabled: bool = True):
    self.log_dir, self.first, self.last = log_dir, start_step + 1, start_step + num_steps
    self.pending, self.active = enabled and num_steps > 0, False

  @contextlib.contextmanager
  def step(self, step: int):
    if self.pending and self.first <= step <= self.last:
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.pending, self.active = False, True
    if not self.active:
      yield
      return
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      yield

  def step_done(self, step: int, outputs) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


# ---------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------
def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  progress_bar: bool = True,
  allow_config_change: bool = False,
) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in `workdir`) and evaluates.

  Returns the final evaluation metrics. Raises TrainingStopped after saving the step
  reached when SIGTERM/SIGINT arrives.
  """
  # 1. Everything that can reject the run, before the workdir is touched: the config,
  # the workdir path, its model, classes and run-defining settings, the weights to
  # start from.
  check_workdir(workdir)
  run = setup(config)
  devices, num_classes = run.devices, run.info.num_classes
  num_devices = len(devices)
  per_device = parallel.per_device_batch_size(config.train.batch_size, num_devices)
  # Loaded for every start (resumed or not): the teacher is not checkpointed. A missing
  # file or other classes stop the run here, before the workdir is touched.
  teacher = None
  if distill.enabled(config):
    fam, key, _ = models.model_variant(config.model)
    student = f'the student ({fam.canonical_name(key)} on {run.info.name})'
    teacher = distill.load_teacher(config.distill.teacher, num_classes, config.dtype, student)
  checkpoint_lib.check_and_write_class_index(
    run.info.name, run.info.class_names, workdir, write=False
  )
  # Reading the workdir verifies its model (signature) and writes nothing.
  with make_checkpointer(config, workdir, num_classes, read_only=True) as reader:
    resuming = reader.latest_step() is not None
  changes = check_resumed_config(config, workdir, allow_config_change)
  main_process = jax.process_index() == 0
  state = run.state
  if not resuming and config.init_from:
    params = weights_lib.initial_params(
      config.model, config.init_from, parallel.to_host(state.params), num_classes
    )
    # A batch-normalised model starts from the file's moving statistics too.
    model_state = weights_lib.load_state_for_model(
      config.init_from, parallel.to_host(state.model_state)
    )
    state = parallel.replicate(
      state._replace(
        params=params,
        ema_params=params,
        model_state=model_state,
        ema_model_state=model_state,
      ),
      devices,
    )

  with contextlib.ExitStack() as stack:
    # 2. One trainer per workdir (process 0 holds the lock for the job), then claim
    # the workdir and restore: a restarted run continues from its newest intact
    # checkpoint.
    held = (
      stack.enter_context(workdir_lib.lock(workdir, command=resume_command()))
      if main_process
      else None
    )
    ckpt = stack.enter_context(make_checkpointer(config, workdir, num_classes, read_only=False))
    if ckpt.latest_step() is not None:
      state = parallel.replicate(restore(ckpt, state), devices)
    start_step = int(state.step)
    if main_process:
      checkpoint_lib.check_and_write_class_index(
        run.info.name, run.info.class_names, workdir, write=True
      )
      fileio.atomic_write_text(
        os.path.join(workdir, CONFIG_FILE), json.dumps(config_to_dict(config), indent=1) + '\n'
      )
      if changes:
        logging.warning(
          'Resumed at step %d with changed settings: %s', start_step, '; '.join(changes)
        )
      # How this start was made, next to the records of the earlier ones (runs.jsonl).
      header = provenance.run_header()
      provenance.append_run_record(
        workdir,
        header,
        start_step=start_step,
        config=config_to_dict(config),
        config_changes=changes,
      )
      print(
        f'{provenance.format_header(header)}\n'
        f'workdir: {workdir}, from step {start_step} of {run.total_steps}',
        file=sys.stderr,  # stdout carries the results
        flush=True,
      )

    if start_step >= run.total_steps:
      finished = recorded_final_eval(workdir, start_step)
      if finished is not None:
        return finished  # a complete run started again: nothing to redo

    # 3. Data and the mapped steps. The data stream is a function of the step: a
    # resumed run sees exactly the batches the uninterrupted run would have.
    train_iter = parallel.prefetch_to_devices(
      data.train_iterator(
        config.data,
        per_device_batch=per_device,
        local_devices=num_devices,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      ),
      devices,
    )
    if teacher is None:
      p_train_step = parallel.map_train_step(
        steps.make_train_step(run.model, run.optimizer, run.schedule, config, num_classes),
        devices,
        mode=config.parallel,
      )
    else:
      p_train_step = distill.map_train_step(
        steps.make_train_step(
          run.model, run.optimizer, run.schedule, config, num_classes, teacher.model
        ),
        devices,
        teacher.params,
        mode=config.parallel,
      )
    p_eval_step = parallel.map_eval_step(
      steps.make_eval_step(run.model, num_classes), devices, mode=config.parallel
    )
    logger = stack.enter_context(
      metrics_lib.MetricsLogger(
        workdir,
        total_steps=run.total_steps,
        progress_bar=progress_bar,
        resume_step=start_step,
      )
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

    # 4. The loop.
    eval_metrics, shown = {}, {}
    stop = stack.enter_context(StopRequests())
    profiler = stack.enter_context(
      StepProfiler(
        os.path.join(workdir, PROFILE_SUBDIR),
        config.profile.start_step,
        config.profile.num_steps,
        enabled=main_process,
      )
    )
    guard = stack.enter_context(contextlib.ExitStack())
    if config.debug.transfer_guard:
      # Only explicit copies in the loop (the prefetcher's device_put, device_get of the
      # metrics, the checkpoint's): an implicit one is a host sync hidden in a step.
      guard.enter_context(jax.transfer_guard('disallow'))
    timer_step, timer_start = start_step, time.perf_counter()
    for step in range(start_step + 1, run.total_steps + 1):
      with profiler.step(step):
        state, metrics = p_train_step(state, next(train_iter))
      profiler.step_done(step, (state, metrics))
      ckpt.check_saves()  # a failed background save stops the run now, not later
      if held is not None:
        held.check()  # a remote lock taken over by another trainer stops this one

      is_last = step == run.total_steps
      stopping = stop.requested(step)
      # The one place that decides to save (the interval, a preemption notice, a stop
      # request or the end); every process reaches the same decision.
      saving = ckpt.should_save(step) or is_last or stopping
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

      if saving:
        with jax.transfer_guard('allow'):  # copying the state to the host is the point
          ckpt.save(step, checkpoint_tree(state))
      if stopping:
        ckpt.wait_until_finished()
        logger.flush()
        raise TrainingStopped(stop.signal_name, step, workdir)
      if is_last:
        ckpt.wait_until_finished()  # the final checkpoint is on disk before the last eval

      if step % config.train.eval_every_steps == 0 or is_last:
        eval_metrics = evaluate_splits(p_eval_step, state, config, config.eval.splits, devices)
        logger.write(step, eval_metrics)
        timer_step, timer_start = step, time.perf_counter()
    profiler.close()  # a window reaching past the last step ends with it
    guard.close()

    # 5. Final evaluation (when resumed at the very end, before it was logged) and export.
    if not eval_metrics:
      eval_metrics = evaluate_splits(p_eval_step, state, config, config.eval.splits, devices)
      logger.write(int(state.step), eval_metrics)
    weights_lib.export_params(
      config.model,
      parallel.to_host(state.ema_params),
      workdir,
      state=parallel.to_host(state.ema_model_state),
    )
  return eval_metrics


# ---------------------------------------------------------------------------
# Evaluation on its own.
# ---------------------------------------------------------------------------
def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  split: Optional[str | Sequence[str]] = None,
  weights: Optional[str] = None,
) -> dict[str, float]:
  """Evaluates the newest checkpoint in `workdir` (raw and EMA parameters), or the
  parameters in a `weights` file (released or converted .npz; raw = EMA = the file's,
  with the file's batch-norm statistics for a batch-normalised model),
  on the evaluation entries `split` (comma-separated or a sequence; default
  `config.eval.splits`), the first logged as `eval_*`, the others as `eval_<entry>/*`.

  Reads the workdir without changing it (a run may be training there); only the
  results are appended to its metrics.jsonl."""
  run = setup(config)
  if jax.process_index() == 0:
    print(provenance.format_header(provenance.run_header()), file=sys.stderr, flush=True)
  state = run.state
  if weights:
    params = weights_lib.load_for_model(config.model, weights, run.info.num_classes)
    model_state = weights_lib.load_state_for_model(weights, parallel.to_host(state.model_state))
    state = state._replace(
      params=params, ema_params=params, model_state=model_state, ema_model_state=model_state
    )
  else:
    with make_checkpointer(config, workdir, run.info.num_classes, read_only=True) as reader:
      if reader.latest_step() is None:
        raise FileNotFoundError(
          f'No checkpoint in {workdir}/checkpoints to evaluate. Train first '
          f'(python -m nfnet_jax.train --config ... --workdir {workdir}) or point '
          '--workdir at a training run.'
        )
      state = restore(reader, state)
  state = parallel.replicate(state, run.devices)
  p_eval_step = parallel.map_eval_step(
    steps.make_eval_step(run.model, run.info.num_classes), run.devices, mode=config.parallel
  )
  results = evaluate_splits(p_eval_step, state, config, split or config.eval.splits, run.devices)
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
    'allow_config_change',
    False,
    'Resume a run whose batch size, length, optimizer, seed or training data settings '
    'were changed (refused by default: the learning rate would jump and the data '
    'order restart).',
    flag_values=values,
  )
  flags.DEFINE_bool(
    'verbose', False, 'Show the traceback of errors, not just their message.', flag_values=values
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


# Errors a user can fix from their message alone: printed as one line, no traceback
# (--verbose shows it). Everything else is a bug and keeps its traceback.
USER_ERRORS = (
  ValueError,  # bad config values, variants, splits, mismatching checkpoints or weights
  KeyError,
  AttributeError,  # a misspelled config field
  FileNotFoundError,
  NotADirectoryError,
  PermissionError,
  FileExistsError,
  NonFiniteLossError,
  cli.UserError,
  weights_lib.PretrainedError,
  checkpoint_lib.CheckpointSaveError,
  checkpoint_lib.CheckpointDamagedError,
  workdir_lib.WorkdirLockedError,
)


def _error_line(e: BaseException) -> str:
  # KeyError/AttributeError messages arrive repr-quoted (ml_collections' "Did you
  # mean" hint included).
  text = e.args[0] if isinstance(e, (KeyError, AttributeError)) and e.args else str(e)
  return ' '.join(str(text).strip().strip('\'"').split())


def main(argv) -> None:
  del argv
  flags_ = flags.FLAGS
  # Orbax narrates every save at INFO; keep the console for the progress bar.
  if not flags_['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if flags_.distributed or flags_.coordinator_address:
    initialize_distributed(flags_.coordinator_address, flags_.num_processes, flags_.process_id)
  try:
    config = flags_.config
    if flags_.mode == 'train':
      results = train_and_evaluate(
        config, flags_.workdir, allow_config_change=flags_.allow_config_change
      )
    else:
      results = evaluate(config, flags_.workdir, weights=flags_.weights)
  except TrainingStopped as e:
    print(f'nfnet-train: {e}', file=sys.stderr)
    sys.exit(e.exit_code)
  except USER_ERRORS as e:
    if flags_.verbose:
      raise
    print(f'nfnet-train: error: {_error_line(e)}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(
      ' '.join(
        f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in sorted(results.items())
      )
    )


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config mistakes (a misspelled field, a value of the wrong
  type, a config file that fails) reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'nfnet-train: error: {e}\nRun with --help for the flags.', file=sys.stderr)
  except USER_ERRORS + (TypeError,) as e:
    if '--verbose' in argv:
      raise
    print(f'nfnet-train: error in the config: {_error_line(e)}', file=sys.stderr)
  sys.exit(2)


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
  app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_main()
