r"""Step latency and memory of the real train/eval steps, as in the paper's table 3
(appendix A.2).

    python -m nfnet_jax.benchmark --variant F0 --mode train --batch-per-device 32 \
        --image-size 192 --dtype bfloat16
    python -m nfnet_jax.benchmark --variant NF-RegNet-B0      # or ResNet50, B0, ...
    python -m nfnet_jax.benchmark --config experiments/nf_regnet.py:B0   # its recipe
    python -m nfnet_jax.benchmark --variant F0 --memory       # with and without --remat
    python -m nfnet_jax.benchmark --paper-table [--models F0,F1,EfficientNet-B7] --csv t.csv

`--paper-table` times each model of `--models` (default: every row of the paper's table 3,
NFNet-F0..F5, F5+SAM, F6+SAM, EfficientNet-B0 and B3..B7, and BN-ResNet50, plus F6
without SAM) under appendix A.2's protocol: its full train step at its own train size, 32
images per device, bfloat16, data preloaded; remat (`config.model.remat`) where XLA's
memory analysis of the compiled step exceeds what the backend says a device holds, or
where the device runs out of memory without it (`--remat`/`--noremat` force it; the CPU
backend reports no memory, so there it stays off). It prints a markdown table against
table 3's TPUv3 and V100 figures (`nfnet_jax.published`) and the F1 vs EfficientNet-B7
speed-up; a model that fails to build, compile or run gets its reason in its row.

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

from nfnet_jax import cli, models, parallel, provenance, published, timm_compare, train
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
  return _memory_figures(fn.lower(*args).compile())


def _memory_figures(compiled) -> dict:
  stats = compiled.memory_analysis()
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
  """The mapped step `fn`; `advance(step, state) -> (state, outputs)`, which runs `step`
  (`fn`, or `fn` compiled ahead of time) once on the preloaded batch; `args(state)`, the
  step's arguments; the first state; the run's description; the devices."""
  config = ml_collections.ConfigDict((config or config_lib.imagenet_config(variant)).to_dict())
  # The config may name the variant by its table key ('50' for BN-ResNet50).
  family, key, _ = models.model_variant(config.model)
  name = family.canonical_name(key)
  config.dtype = dtype
  if width:  # not every family has a width multiplier (EfficientNets scale by variant)
    config.model.kwargs.width = width
  width = config.model.kwargs.get('width', '')
  if remat is not None:
    config.model.remat = remat
  parallel_mode = parallel_mode or config.get('parallel', parallel.DEFAULT_MODE)
  size = image_size or (config.data.image_size if mode == 'train' else config.data.eval_image_size)
  devices = parallel.local_devices(num_devices or None)
  n = len(devices)
  config.train.batch_size = batch_per_device * n
  # As train.setup builds it: any family, batch norm's statistics as Haiku state.
  model = models.build_model_with_state(config.model, num_classes, dtype)
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
    advance = lambda step, s: step(s, batch)  # noqa: E731
  else:
    fn = parallel.map_eval_step(
      steps_lib.make_eval_step(model, num_classes), devices, mode=parallel_mode
    )
    # The mapped eval step is a plain function (it fills in the model states' default):
    # jit it whole so that it can be compiled ahead of time and its memory analysed.
    fn = fn if hasattr(fn, 'lower') else jax.jit(fn)
    args = lambda s: (s.params, s.ema_params, batch, (s.model_state, s.ema_model_state))  # noqa: E731
    advance = lambda step, s: (s, step(*args(s)))  # noqa: E731
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
  return fn, advance, args, state, row, devices


def _environment(devices) -> dict:
  return dict(
    device=str(devices[0].device_kind),
    backend=jax.default_backend(),
    cpu_count=os.cpu_count(),
    host=platform.processor() or platform.machine(),
  )


def device_memory_mib(device) -> Optional[float]:
  """What the backend says one device can allocate, in MiB (None: it does not say; the
  CPU backend does not)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without the query raise various errors
    return None
  limit = (stats or {}).get('bytes_limit')
  return limit / MIB if limit else None


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
  auto_remat: bool = False,
) -> dict:
  """Times `steps` steps after `warmup` untimed ones; returns the figures as a dict (one
  CSV row).

  `config` (default: `config.imagenet_config(variant)`) gives the model and optimizer;
  `width` 0 keeps the config's width; `remat` None keeps `config.model.remat`, unless
  `auto_remat`: then the step is compiled without remat and, if XLA's memory analysis
  says it needs more than the device has (`device_memory_mib`), compiled again with it
  (`remat_choice` says which happened). `parallel_mode` '' keeps `config.parallel`. The
  row includes the compiled step's memory per device (`compiled_memory`).
  """
  choice = 'config' if remat is None else 'flag'
  with layers.conv_impl(conv_impl):
    setup = lambda remat: _setup(  # noqa: E731
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
    fn, advance, args, state, row, devices = setup(remat)
    start = time.perf_counter()
    compiled = fn.lower(*args(state)).compile()
    compile_s = time.perf_counter() - start
    memory = _memory_figures(compiled)
    if auto_remat and remat is None and not row['remat']:
      limit = device_memory_mib(devices[0])
      if limit is None or not memory:
        choice = 'auto: no device memory figure, off'
      elif memory['peak_mib'] <= limit:
        choice = f'auto: fits ({memory["peak_mib"]:.0f} of {limit:.0f} MiB), off'
      else:
        choice = f'auto: {memory["peak_mib"]:.0f} MiB > {limit:.0f} MiB without, on'
        del compiled, state
        fn, advance, args, state, row, devices = setup(True)
        start = time.perf_counter()
        compiled = fn.lower(*args(state)).compile()
        compile_s += time.perf_counter() - start
        memory = _memory_figures(compiled)
    state, out = advance(compiled, state)
    for _ in range(max(0, warmup - 1)):
      state, out = advance(compiled, state)
    jax.block_until_ready((state, out))
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, out = advance(compiled, state)
      jax.block_until_ready((state, out))
      times.append(time.perf_counter() - start)
    resolved_conv_impl = layers.resolved_conv_impl()

  ms = statistics.median(times) * 1000
  n = len(devices)
  return dict(
    **row,
    remat_choice=choice,
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


# ---------------------------------------------------------------------------
# The paper's table 3: every model's train step under appendix A.2's protocol.
# ---------------------------------------------------------------------------
# Table 3's rows, with F6 without SAM (the table has F6 only with SAM) after F5.
PAPER_MODELS = tuple(
  name for key in published.PAPER_TABLE3 for name in ((key, 'F6') if key == 'F5' else (key,))
)
PAPER_FIELDS = (
  'model',
  'image_size',
  'batch_per_device',
  'devices',
  'dtype',
  'ms_per_step',
  'img_per_s',
  'paper_tpuv3_ms',
  'paper_v100_ms',
  'remat',
  'remat_choice',
  'sam',
  'compile_s',
  'peak_mib',
  'device',
  'backend',
  'error',
)


def check_models(names: Sequence[str]) -> list[str]:
  """`names` if each is a row of table 3 or a model of the registry; else a one-line
  error listing the valid names."""
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in published.PAPER_TABLE3 and not _registered(n)]
  if unknown or not names:
    registry = ', '.join(
      fam.canonical_name(key)
      for fam in (*models.FAMILIES.values(), *models.BASELINES.values())
      for key in fam.variants
    )
    raise ValueError(
      f'Unknown model(s) {", ".join(unknown) or "(none given)"} in --models; valid: '
      f'the rows of table 3 ({", ".join(PAPER_MODELS)}) or any registered model ({registry}).'
    )
  return names


def _registered(name: str) -> bool:
  try:
    models.resolve(name)
  except ValueError:
    return False
  return True


def paper_row_config(name: str) -> ml_collections.ConfigDict:
  """The config a row times: its model's ImageNet config (`config.imagenet_config`: the
  family's released arguments, the variant's train size, the NFNet paper's optimizer),
  with SAM on for table 3's SAM rows as experiments/nfnet.py sets it for them."""
  row = published.PAPER_TABLE3.get(name)
  model = row.model if row else name
  if not _registered(model):
    raise ValueError(f'{model} is not a registered model (nfnet_jax.models) yet.')
  config = config_lib.imagenet_config(model)
  if row and row.sam:
    try:  # The SAM recipe's one home: the experiment file (run from the repository root).
      from experiments import nfnet as nfnet_experiment  # noqa: PLC0415
    except ImportError as e:
      raise ValueError(
        f'{name} takes its SAM settings from experiments/nfnet.py, which is not importable '
        f'({e}): run from the repository root.'
      ) from e
    sam_config = nfnet_experiment.get_config(name).optimizer
    config.optimizer.update(
      sam_rho=sam_config.sam_rho, sam_ascent_fraction=sam_config.sam_ascent_fraction
    )
  return config


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def _out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text


def paper_table(
  names: Sequence[str] = PAPER_MODELS,
  batch_per_device: int = 32,
  image_size: int = 0,
  dtype: str = 'bfloat16',
  conv_impl: str = 'auto',
  steps: int = 20,
  warmup: int = 3,
  num_devices: int = 0,
  num_classes: int = 1000,
  width: float = 0.0,
  remat: Optional[bool] = None,
  parallel_mode: str = '',
  progress=None,
) -> list[dict]:
  """One `PAPER_FIELDS` row per model of `names` (`check_models`): its full train step
  (`benchmark`) at its own train size (or `image_size`), with table 3's figures for it.

  `remat` None decides per model (`benchmark`'s `auto_remat`, then a retry with remat
  when the device runs out of memory); True/False forces it. A model that fails to
  build, compile or run gets its one-line reason in `error`; the others still run.
  `progress(row)` is called after each row.
  """
  rows = []
  for name in check_models(names):
    paper = published.PAPER_TABLE3.get(name)
    row = dict.fromkeys(PAPER_FIELDS, '')
    row.update(
      model=name,
      batch_per_device=batch_per_device,
      dtype=dtype,
      paper_tpuv3_ms=paper.tpuv3_ms if paper else '',
      paper_v100_ms=paper.v100_ms if paper and paper.v100_ms is not None else '',
      sam=bool(paper and paper.sam),
    )
    try:
      config = paper_row_config(name)
      row['image_size'] = image_size or config.data.image_size
      kwargs = dict(
        batch_per_device=batch_per_device,
        image_size=image_size,
        dtype=dtype,
        conv_impl=conv_impl,
        steps=steps,
        warmup=warmup,
        num_devices=num_devices,
        num_classes=num_classes,
        width=width,
        config=config,
        parallel_mode=parallel_mode,
      )
      try:
        result = benchmark(remat=remat, auto_remat=remat is None, **kwargs)
      except Exception as e:  # noqa: BLE001 - retried once, then reported in the row
        if remat is not None or not _out_of_memory(e):
          raise
        result = benchmark(remat=True, **kwargs)
        result['remat_choice'] = 'auto: out of memory without, on'
      row.update(
        {k: result[k] for k in ('image_size', 'devices', 'remat', 'remat_choice', 'compile_s')},
        ms_per_step=result['ms_per_step'],
        img_per_s=result['images_per_sec'],
        peak_mib=result['peak_mib'],
        device=result['device'],
        backend=result['backend'],
      )
    except Exception as e:  # noqa: BLE001 - one model's failure must not end the table
      row['error'] = f'{type(e).__name__}: {_one_line(e)}'
    rows.append(row)
    if progress:
      progress(row)
  return rows


def _ratio(measured, paper) -> str:
  return f'{measured / paper:.2f}' if measured != '' and paper != '' else ''


def speedup_line(rows: Sequence[dict]) -> str:
  """The paper's headline (F1 vs EfficientNet-B7 step time) measured in this run, next
  to table 3's."""
  fast, slow = published.HEADLINE_PAIR
  paper = published.headline_speedups()
  quoted = f'paper (table 3): {paper["tpuv3"]:.1f}x TPUv3, {paper["v100"]:.1f}x V100'
  by_name = {row['model']: row for row in rows}
  missing = [
    f'{n} {"not in this run" if n not in by_name else "failed"}'
    for n in (fast, slow)
    if by_name.get(n, {}).get('ms_per_step', '') == ''
  ]
  if missing:
    measured = f'measured: n/a ({", ".join(missing)})'
  else:
    f_ms, s_ms = by_name[fast]['ms_per_step'], by_name[slow]['ms_per_step']
    measured = f'measured: {s_ms / f_ms:.1f}x ({s_ms} / {f_ms} ms)'
  return f'{fast} vs {slow} train-step speed-up: {measured}; {quoted}.'


def markdown_table(rows: Sequence[dict]) -> str:
  lines = [
    '| model | px | batch/device | dtype | remat | ms/step | img/s | paper TPUv3 ms | '
    'measured / TPUv3 | paper V100 ms | measured / V100 |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    measured = (
      f'{row["ms_per_step"]} | {row["img_per_s"]}'
      if not row['error']
      else f'failed: {row["error"].replace("|", "/")} | '
    )
    lines.append(
      f'| {row["model"]} | {row["image_size"]} | {row["batch_per_device"]} | {row["dtype"]} | '
      f'{"on" if row["remat"] is True else "off" if row["remat"] is False else ""} | '
      f'{measured} | {row["paper_tpuv3_ms"]} | '
      f'{_ratio(row["ms_per_step"], row["paper_tpuv3_ms"])} | {row["paper_v100_ms"]} | '
      f'{_ratio(row["ms_per_step"], row["paper_v100_ms"])} |'
    )
  return '\n'.join(lines)


def write_csv(path: str, rows: Sequence[dict], fields: Sequence[str]) -> None:
  with open(path, 'w', newline='') as fh:
    writer = csv.DictWriter(fh, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)


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
  flags.DEFINE_integer(
    'warmup', 3, 'Untimed steps after compiling (at least 1).', flag_values=values
  )
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
  flags.DEFINE_string(
    'csv',
    '',
    'Append the result as a CSV row to this file (--paper-table: write the table to it).',
    flag_values=values,
  )
  flags.DEFINE_bool(
    'paper_table',
    False,
    "Time every model of --models (the paper's table 3 by default) at its own train size "
    "and print a markdown table against the paper's figures; --remat unset: remat where "
    "a step does not fit the device's memory.",
    flag_values=values,
  )
  flags.DEFINE_list(
    'models',
    list(PAPER_MODELS),
    'With --paper-table: the models, by table-3 row (F5+SAM, ...) or registry name.',
    flag_values=values,
  )
  flags.DEFINE_bool(
    'compare_timm',
    False,
    "Time timm's port of --variant (dm_nfnet_f0..f6; needs torch and timm) beside ours in "
    'this process: train step and eval forward, float32 (nfnet_jax.timm_compare).',
    flag_values=values,
  )


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
  if f.paper_table:
    return _paper_table_cli(f)
  if f.compare_timm:
    return timm_compare.compare_cli(f)
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


def _paper_table_cli(f: flags.FlagValues) -> int:
  if f.config is not None:
    raise ValueError("--paper-table builds each model's own config: drop --config.")
  names = check_models(f.models)  # before any compiling

  def progress(row):
    done = row['error'] or f'{row["ms_per_step"]} ms/step, remat {row["remat_choice"]}'
    print(f'{row["model"]} ({row["image_size"]} px): {done}', file=sys.stderr, flush=True)

  rows = paper_table(
    names,
    f.batch_per_device,
    f.image_size,
    f.dtype,
    f.conv_impl,
    f.steps,
    f.warmup,
    f.num_devices,
    f.num_classes,
    f.width,
    remat=f.remat,
    parallel_mode=f.parallel,
    progress=progress,
  )
  print(markdown_table(rows))
  print()
  print(speedup_line(rows))
  if f.csv:
    write_csv(f.csv, rows, PAPER_FIELDS)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_benchmark_cli, define_flags, argv, user_errors=(cli.UserError, ValueError))


if __name__ == '__main__':
  sys.exit(main())
