"""Step latency of the real train/eval steps, as in the paper's table 3.

    python -m nfnet_jax.benchmark --variant F0 --mode train --batch-per-device 32 \
        --image-size 192 --dtype bfloat16
    python -m nfnet_jax.benchmark --variant B0      # NF-RegNet (or ResNet50: NF-ResNet)

Times the same per-device step that training runs (forward, backward, pmean,
AGC + SGD, EMA, metrics; each family with its experiments/ config's optimizer and
model arguments), mapped over the local devices, on synthetic data
already on the devices ("data preloaded", as the paper measured). Prints the
compile time and the median ms/step and images/s over the timed steps; with
--csv, appends one row per run. A script, not a test: CI never runs it.
"""
import csv
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from nfnet_jax import config as config_lib
from nfnet_jax import layers
from nfnet_jax import models
from nfnet_jax import parallel
from nfnet_jax import train


def benchmark(variant: str = 'F0', mode: str = 'train', batch_per_device: int = 32,
              image_size: int = 0, dtype: str = 'bfloat16', conv_impl: str = 'auto',
              steps: int = 20, warmup: int = 3, num_devices: int = 0,
              num_classes: int = 1000, width: float = 0.0) -> dict:
  config = config_lib.load_experiment(EXPERIMENTS[models.family_of_variant(variant)],
                                      variant)
  config.dtype = dtype
  width = width or config.model.kwargs.width      # 0: the family's default
  config.model.kwargs.width = width
  size = image_size or (config.data.image_size if mode == 'train'
                        else config.data.eval_image_size)
  devices = parallel.local_devices(num_devices or None)
  n = len(devices)
  config.train.batch_size = batch_per_device * n
  model = models.build_model(config.model, num_classes, dtype)
  optimizer, schedule = train.make_optimizer(config, total_steps=1000, steps_per_epoch=100)

  rng = np.random.default_rng(0)
  images = rng.normal(size=(n, batch_per_device, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(n, batch_per_device)).astype(np.int32)
  # Preload the batch, split over the devices like pmap expects it.
  sharded = jax.pmap(lambda x: x, devices=devices)(
      {'images': images, 'labels': labels, 'mask': np.ones(labels.shape, np.float32)})

  with layers.conv_impl(conv_impl):
    state = train.init_state(jax.random.PRNGKey(0), model, optimizer, size)
    if mode == 'train':
      fn = parallel.map_train_step(
          train.make_train_step(model, optimizer, schedule, config, num_classes), devices)
      run = lambda s: fn(s, sharded)
    else:
      fn = parallel.map_eval_step(train.make_eval_step(model, num_classes), devices)
      run = lambda s: (s, fn(s['params'], s['ema_params'], sharded))

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

  ms = statistics.median(times) * 1000
  return dict(variant=variant, mode=mode, batch_per_device=batch_per_device, devices=n,
              image_size=size, dtype=dtype, conv_impl=layers_impl(conv_impl),
              width=width, compile_s=round(compile_s, 2), ms_per_step=round(ms, 1),
              images_per_sec=round(batch_per_device * n / (ms / 1000), 1),
              steps=steps, device=str(devices[0].device_kind),
              backend=jax.default_backend(), cpu_count=os.cpu_count(),
              host=platform.processor() or platform.machine())


# Each family's ImageNet config in experiments/.
EXPERIMENTS = {'NFNet': 'nfnet', 'NFResNet': 'nf_resnet', 'NFRegNet': 'nf_regnet'}


def layers_impl(conv_impl: str) -> str:
  with layers.conv_impl(conv_impl):
    return layers.resolved_conv_impl()


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  result = benchmark(f.variant, f.mode, f.batch_per_device, f.image_size, f.dtype,
                     f.conv_impl, f.steps, f.warmup, f.num_devices, f.num_classes,
                     f.width)
  print(f"{result['variant']} {result['mode']}: batch {result['batch_per_device']}/device x "
        f"{result['devices']} {result['device']}, {result['image_size']}px, "
        f"{result['dtype']}, conv {result['conv_impl']}: compile {result['compile_s']} s, "
        f"{result['ms_per_step']} ms/step (median of {result['steps']}), "
        f"{result['images_per_sec']} img/s")
  if f.csv:
    new = not os.path.exists(f.csv)
    with open(f.csv, 'a', newline='') as fh:
      writer = csv.DictWriter(fh, fieldnames=list(result))
      if new:
        writer.writeheader()
      writer.writerow(result)


def run_main():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('variant', 'F0', 'F0..F7, F0+..F7+ (NFNet), ResNet50..ResNet600 '
                      '(NF-ResNet) or B0..B8 (NF-RegNet).')
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Which step to time.')
  flags.DEFINE_integer('batch_per_device', 32, 'Images per device (paper: 32).')
  flags.DEFINE_integer('image_size', 0, "Pixels; 0: the variant's train/test size.")
  flags.DEFINE_enum('dtype', 'bfloat16', list(models.DTYPES), 'Compute dtype.')
  flags.DEFINE_enum('conv_impl', 'auto', list(layers.CONV_IMPLS),
                    'Convolution lowering (auto: dense on CPU, native elsewhere).')
  flags.DEFINE_integer('steps', 20, 'Timed steps (median reported).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps, the first one compiles.')
  flags.DEFINE_integer('num_devices', 0, '0: every local device.')
  flags.DEFINE_integer('num_classes', 1000, 'Classifier width.')
  flags.DEFINE_float('width', 0.0, "Channel multiplier; 0: the family's (1, 4, 0.75).")
  flags.DEFINE_string('csv', '', 'Append the result as a CSV row to this file.')
  # Accept --batch-per-device as well as absl's --batch_per_device.
  sys.argv = [_dashes_to_underscores(a) for a in sys.argv]
  app.run(main)


def _dashes_to_underscores(arg: str) -> str:
  if not arg.startswith('--'):
    return arg
  name, eq, value = arg[2:].partition('=')
  return '--' + name.replace('-', '_') + eq + value


if __name__ == '__main__':
  run_main()
