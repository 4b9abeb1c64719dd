r"""Step latency and memory of the real train/eval steps, as in the paper's table 3
(appendix A.2).

    python -m nfnet_jax.benchmark --variant F0 --mode train --batch-per-device 32 \
        --image-size 192 --dtype bfloat16
    python -m nfnet_jax.benchmark --variant NF-RegNet-B0      # or ResNet50, B0, ...
    python -m nfnet_jax.benchmark --config experiments/nf_regnet.py:B0   # its recipe
    python -m nfnet_jax.benchmark --variant F0 --memory       # with and without --remat

Times the same per-device step that training runs (forward, backward, pmean, the
optimizer, EMA, metrics), mapped over the local devices (`--parallel`: shard_map or
pmap), on synthetic data already on the devices ("data preloaded", as the paper
measured). The step is the one a config describes: `--config` (any experiments/ file,
with `--config.x=...` overrides, as for training), or, without it,
`nfnet_jax.config.imagenet_config(variant)`: the variant's family's released model
arguments and the NFNet paper's optimizer (AGC + Nesterov SGD). `--remat` recomputes
each residual block's activations in the backward pass (`config.model.remat`).

Prints the versions, git commit and devices (`provenance.format_header`, on stderr), then
the compile time, the median ms/step and images/s over the timed steps, and the
compiled step's memory per device from XLA's memory analysis; with --csv, appends one
row per run. `--memory` compiles the step without and with remat and prints both
memory figures (nothing is run or timed). For F0 at 192 px, 32 images per device,
bfloat16, jaxlib 0.12's CPU backend gives a peak of 5206 MiB without remat and 2283 MiB
with it; jaxlib 0.10.2's CPU backend folds the recomputation back into the forward
pass (5043 and 5018 MiB), so measure remat's saving with a jaxlib that keeps it.
A script, not a test: CI never runs it.
"""

import csv
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from nfnet_jax import cli, models, parallel, provenance, train
from nfnet_jax import config as config_lib
from nfnet_jax import steps as steps_lib
from nfnet_jax.models import layers

MIB = 2**20


def compiled_memory(fn, *args) -> dict:
  """XLA's memory analysis of `fn` compiled for `args` (per device), in MiB.

  `peak_mib` = arguments + outputs - aliased + temporaries: the outputs that reuse a
  donated argument's buffer (`alias`, the updated state) are counted once. It is the
  size of every buffer the executable allocates, an upper bound on what is live at
  once. Backends that give no analysis return {}. Compiling after a first call with
  the same arguments reuses jit's compiled program.
  """
  stats = fn.lower(*args).compile().memory_analysis()
  if stats is None:
    return {}
  sizes = {
    name: getattr(stats, f'{name}_size_in_bytes', 0) / MIB
    for name in ('argument', 'output', 'alias', 'temp')
  }
  peak = sizes['argument'] + sizes['output'] - sizes['alias'] + sizes['temp']
  return {'peak_mib': peak, **{f'{name}_mib': value for name, value in sizes.items()}}


MEMORY_FIELDS = ('peak_mib', 'temp_mib', 'argument_mib', 'output_mib', 'alias_mib')


def _setup(
  variant,
  mode,
  batch_per_device,
  image_size,
  dtype,
  num_devices,
  num_classes,
  width,
  config,
  remat,
  parallel_mode,
):
  """The mapped step, its first arguments and the run's description."""
  config = ml_collections.ConfigDict((config or config_lib.imagenet_config(variant)).to_dict())
  name = models.canonical_name(config.model.kwargs.variant)
  config.dtype = dtype
  config.model.kwargs.width = width = width or config.model.kwargs.width
  if remat is not None:
    config.model.remat = remat
  parallel_mode = parallel_mode or config.get('parallel', parallel.DEFAULT_MODE)
  size = image_size or (config.data.image_size if mode == 'train' else config.data.eval_image_size)
  devices = parallel.local_devices(num_devices or None)
  n = len(devices)
  config.train.batch_size = batch_per_device * n
  model = models.build_model(config.model, num_classes, dtype)
  optimizer, schedule = train.make_optimizer(config, total_steps=1000, steps_per_epoch=100)

  rng = np.random.default_rng(0)
  images = rng.normal(size=(n, batch_per_device, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(n, batch_per_device)).astype(np.int32)
  # Preload the batch, split over the devices as the mapped steps take it.
  batch = jax.device_put(
    {'images': images, 'labels': labels, 'mask': np.ones(labels.shape, np.float32)},
    parallel.batch_sharding(devices),
  )
  state = parallel.replicate(
    steps_lib.init_state(jax.random.PRNGKey(0), model, optimizer, size), devices
  )
  if mode == 'train':
    fn = parallel.map_train_step(
      steps_lib.make_train_step(model, optimizer, schedule, config, num_classes),
      devices,
      mode=parallel_mode,
    )
    args = lambda s: (s, batch)  # noqa: E731
    run = lambda s: fn(s, batch)  # noqa: E731
  else:
    fn = parallel.map_eval_step(
      steps_lib.make_eval_step(model, num_classes), devices, mode=parallel_mode
    )
    args = lambda s: (s.params, s.ema_params, batch)  # noqa: E731
    run = lambda s: (s, fn(s.params, s.ema_params, batch))  # noqa: E731
  row = dict(
    variant=name,
    mode=mode,
    batch_per_device=batch_per_device,
    devices=n,
    image_size=size,
    dtype=dtype,
    width=width,
    parallel=parallel_mode,
    remat=bool(config.model.get('remat', False)),
  )
  return fn, run, args, state, row, devices


def _environment(devices) -> dict:
  return dict(
    device=str(devices[0].device_kind),
    backend=jax.default_backend(),
    cpu_count=os.cpu_count(),
    host=platform.processor() or platform.machine(),
  )


def benchmark(
  variant: str = 'F0',
  mode: str = 'train',
  batch_per_device: int = 32,
  image_size: int = 0,
  dtype: str = 'bfloat16',
  conv_impl: str = 'auto',
  steps: int = 20,
  warmup: int = 3,
  num_devices: int = 0,
  num_classes: int = 1000,
  width: float = 0.0,
  config: Optional[ml_collections.ConfigDict] = None,
  remat: Optional[bool] = None,
  parallel_mode: str = '',
) -> dict:
  """Times `steps` steps; returns the figures as a dict (one CSV row).

  `config` (default: `config.imagenet_config(variant)`) gives the model and optimizer;
  `width` 0 keeps the config's width; `remat` None keeps `config.model.remat`;
  `parallel_mode` '' keeps `config.parallel`. The row includes the compiled step's
  memory per device (`compiled_memory`).
  """
  with layers.conv_impl(conv_impl):
    fn, run, args, state, row, devices = _setup(
      variant,
      mode,
      batch_per_device,
      image_size,
      dtype,
      num_devices,
      num_classes,
      width,
      config,
      remat,
      parallel_mode,
    )
    start = time.perf_counter()
    state, out = run(state)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - start
    memory = compiled_memory(fn, *args(state))
    for _ in range(max(0, warmup - 1)):
      state, out = run(state)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, out = run(state)
      jax.block_until_ready((state, out))
      times.append(time.perf_counter() - start)
    resolved_conv_impl = layers.resolved_conv_impl()

  ms = statistics.median(times) * 1000
  n = len(devices)
  return dict(
    **row,
    conv_impl=resolved_conv_impl,
    compile_s=round(compile_s, 2),
    ms_per_step=round(ms, 1),
    images_per_sec=round(batch_per_device * n / (ms / 1000), 1),
    steps=steps,
    **{k: round(memory[k], 3) if k in memory else '' for k in MEMORY_FIELDS},
    **_environment(devices),
  )


def memory(
  variant: str = 'F0',
  mode: str = 'train',
  batch_per_device: int = 32,
  image_size: int = 0,
  dtype: str = 'bfloat16',
  conv_impl: str = 'auto',
  num_devices: int = 0,
  num_classes: int = 1000,
  width: float = 0.0,
  config: Optional[ml_collections.ConfigDict] = None,
  parallel_mode: str = '',
) -> list[dict]:
  """The compiled step's memory per device without and with remat (one row each).

  Compiles only: nothing runs, so a step too big for the device can still be sized.
  """
  rows = []
  for remat in (False, True):
    with layers.conv_impl(conv_impl):
      fn, _, args, state, row, devices = _setup(
        variant,
        mode,
        batch_per_device,
        image_size,
        dtype,
        num_devices,
        num_classes,
        width,
        config,
        remat,
        parallel_mode,
      )
      start = time.perf_counter()
      figures = compiled_memory(fn, *args(state))
      compile_s = time.perf_counter() - start
      resolved_conv_impl = layers.resolved_conv_impl()
    rows.append(
      dict(
        **row,
        conv_impl=resolved_conv_impl,
        compile_s=round(compile_s, 2),
        ms_per_step='',
        images_per_sec='',
        steps=0,
        **{k: round(figures[k], 3) if k in figures else '' for k in MEMORY_FIELDS},
        **_environment(devices),
      )
    )
  return rows


def define_flags(values: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Optional experiment config whose model and optimizer to time, '
    'e.g. experiments/nf_regnet.py:B0 (fields overridable with --config.x=...); '
    'default: the ImageNet recipe of --variant.',
    lock_config=True,
    flag_values=values,
  )
  flags.DEFINE_string(
    'variant',
    'F0',
    'Without --config: F0..F7, F0+..F7+ (NFNet), '
    'NF-ResNet50..NF-ResNet600 (or ResNet50..) or NF-RegNet-B0..B8 '
    '(or B0..).',
    flag_values=values,
  )
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Which step to time.', flag_values=values)
  flags.DEFINE_integer('batch_per_device', 32, 'Images per device (paper: 32).', flag_values=values)
  flags.DEFINE_integer(
    'image_size', 0, "Pixels; 0: the variant's train/test size.", flag_values=values
  )
  flags.DEFINE_enum('dtype', 'bfloat16', list(models.DTYPES), 'Compute dtype.', flag_values=values)
  flags.DEFINE_enum(
    'conv_impl',
    'auto',
    list(layers.CONV_IMPLS),
    'Convolution lowering (auto: dense on CPU, native elsewhere).',
    flag_values=values,
  )
  flags.DEFINE_integer('steps', 20, 'Timed steps (median reported).', flag_values=values)
  flags.DEFINE_integer('warmup', 3, 'Untimed steps, the first one compiles.', flag_values=values)
  flags.DEFINE_integer('num_devices', 0, '0: every local device.', flag_values=values)
  flags.DEFINE_integer('num_classes', 1000, 'Classifier width.', flag_values=values)
  flags.DEFINE_float(
    'width',
    0.0,
    "Channel multiplier; 0: the config's (the family's released width: 1, 4, 0.75).",
    flag_values=values,
  )
  flags.DEFINE_bool(
    'remat',
    None,
    "Recompute each residual block's activations in the backward pass "
    "(config.model.remat); unset: the config's.",
    flag_values=values,
  )
  flags.DEFINE_enum(
    'parallel',
    '',
    ['', *parallel.MODES],
    "How the step is mapped over the devices; '': the config's (config.parallel).",
    flag_values=values,
  )
  flags.DEFINE_bool(
    'memory',
    False,
    "Compile the step without and with --remat and print XLA's memory analysis of "
    'each (per device); nothing is timed.',
    flag_values=values,
  )
  flags.DEFINE_string('csv', '', 'Append the result as a CSV row to this file.', flag_values=values)


def _mib(row: dict) -> str:
  if row['peak_mib'] == '':
    return 'no memory analysis on this backend'
  return (
    f'peak {row["peak_mib"]:.1f} MiB/device (temporaries {row["temp_mib"]:.1f}, '
    f'arguments {row["argument_mib"]:.1f}, outputs {row["output_mib"]:.1f}, '
    f'of which donated {row["alias_mib"]:.1f})'
  )


def _describe(row: dict) -> str:
  return (
    f'{row["variant"]} {row["mode"]}: batch {row["batch_per_device"]}/device x '
    f'{row["devices"]} {row["device"]}, {row["image_size"]}px, '
    f'{row["dtype"]}, conv {row["conv_impl"]}, {row["parallel"]}'
    f'{", remat" if row["remat"] else ""}'
  )


def _benchmark_cli(f: flags.FlagValues, positional: list[str]) -> int:
  del positional  # cli.run refuses positional arguments
  # On stderr: stdout carries the figures alone.
  print(provenance.format_header(provenance.run_header()), file=sys.stderr, flush=True)
  if f.memory:
    rows = memory(
      f.variant,
      f.mode,
      f.batch_per_device,
      f.image_size,
      f.dtype,
      f.conv_impl,
      f.num_devices,
      f.num_classes,
      f.width,
      config=f.config,
      parallel_mode=f.parallel,
    )
    for row in rows:
      print(f'{_describe(row)}: compile {row["compile_s"]} s, {_mib(row)}')
    off, on = rows
    if off['peak_mib'] != '' and off['peak_mib']:
      print(f'remat: peak x{on["peak_mib"] / off["peak_mib"]:.2f}')
  else:
    rows = [
      benchmark(
        f.variant,
        f.mode,
        f.batch_per_device,
        f.image_size,
        f.dtype,
        f.conv_impl,
        f.steps,
        f.warmup,
        f.num_devices,
        f.num_classes,
        f.width,
        config=f.config,
        remat=f.remat,
        parallel_mode=f.parallel,
      )
    ]
    (result,) = rows
    print(
      f'{_describe(result)}: compile {result["compile_s"]} s, '
      f'{result["ms_per_step"]} ms/step (median of {result["steps"]}), '
      f'{result["images_per_sec"]} img/s; {_mib(result)}'
    )
  if f.csv:
    new = not os.path.exists(f.csv)
    with open(f.csv, 'a', newline='') as fh:
      writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
      if new:
        writer.writeheader()
      writer.writerows(rows)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_benchmark_cli, define_flags, argv, user_errors=(cli.UserError, ValueError))


if __name__ == '__main__':
  sys.exit(main())
