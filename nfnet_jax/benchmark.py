r"""Step latency of the real train/eval steps, as in the paper's table 3 (appendix A.2).

    python -m nfnet_jax.benchmark --variant F0 --mode train --batch-per-device 32 \
        --image-size 192 --dtype bfloat16
    python -m nfnet_jax.benchmark --variant NF-RegNet-B0      # or ResNet50, B0, ...
    python -m nfnet_jax.benchmark --config experiments/nf_regnet.py:B0   # its recipe

Times the same per-device step that training runs (forward, backward, pmean, the
optimizer, EMA, metrics), mapped over the local devices, on synthetic data already on
the devices ("data preloaded", as the paper measured). The step is the one a config
describes: `--config` (any experiments/ file, with `--config.x=...` overrides, as for
training), or, without it, `nfnet_jax.config.imagenet_config(variant)`: the variant's
family's released model arguments and the NFNet paper's optimizer (AGC + Nesterov SGD).
Prints the compile time and the median ms/step and images/s over the timed steps; with
--csv, appends one row per run. A script, not a test: CI never runs it.
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

from nfnet_jax import cli, models, parallel, train
from nfnet_jax import config as config_lib
from nfnet_jax import steps as steps_lib
from nfnet_jax.models import layers


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
) -> dict:
  """Times `steps` steps; returns the figures as a dict (one CSV row).

  `config` (default: `config.imagenet_config(variant)`) gives the model and optimizer;
  `width` 0 keeps the config's width.
  """
  config = ml_collections.ConfigDict((config or config_lib.imagenet_config(variant)).to_dict())
  name = models.canonical_name(config.model.kwargs.variant)
  config.dtype = dtype
  config.model.kwargs.width = width = width or config.model.kwargs.width
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

  with layers.conv_impl(conv_impl):
    state = parallel.replicate(
      steps_lib.init_state(jax.random.PRNGKey(0), model, optimizer, size), devices
    )
    if mode == 'train':
      fn = parallel.map_train_step(
        steps_lib.make_train_step(model, optimizer, schedule, config, num_classes), devices
      )
      run = lambda s: fn(s, batch)  # noqa: E731
    else:
      fn = parallel.map_eval_step(steps_lib.make_eval_step(model, num_classes), devices)
      run = lambda s: (s, fn(s.params, s.ema_params, batch))  # noqa: E731

    start = time.perf_counter()
    state, out = run(state)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - start
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
  return dict(
    variant=name,
    mode=mode,
    batch_per_device=batch_per_device,
    devices=n,
    image_size=size,
    dtype=dtype,
    conv_impl=resolved_conv_impl,
    width=width,
    compile_s=round(compile_s, 2),
    ms_per_step=round(ms, 1),
    images_per_sec=round(batch_per_device * n / (ms / 1000), 1),
    steps=steps,
    device=str(devices[0].device_kind),
    backend=jax.default_backend(),
    cpu_count=os.cpu_count(),
    host=platform.processor() or platform.machine(),
  )


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
  flags.DEFINE_string('csv', '', 'Append the result as a CSV row to this file.', flag_values=values)


def _benchmark_cli(f: flags.FlagValues, positional: list[str]) -> int:
  del positional  # cli.run refuses positional arguments
  result = benchmark(
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
  )
  print(
    f'{result["variant"]} {result["mode"]}: batch {result["batch_per_device"]}/device x '
    f'{result["devices"]} {result["device"]}, {result["image_size"]}px, '
    f'{result["dtype"]}, conv {result["conv_impl"]}: compile {result["compile_s"]} s, '
    f'{result["ms_per_step"]} ms/step (median of {result["steps"]}), '
    f'{result["images_per_sec"]} img/s'
  )
  if f.csv:
    new = not os.path.exists(f.csv)
    with open(f.csv, 'a', newline='') as fh:
      writer = csv.DictWriter(fh, fieldnames=list(result))
      if new:
        writer.writeheader()
      writer.writerow(result)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_benchmark_cli, define_flags, argv, user_errors=(cli.UserError, ValueError))


if __name__ == '__main__':
  sys.exit(main())
