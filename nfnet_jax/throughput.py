r"""Input-pipeline throughput: images/s per CPU core, against a plain PIL pipeline.

    python -m nfnet_jax.throughput --variant F0 --images 256 --batches 12
    python -m nfnet_jax.throughput --config experiments/nfnet.py:F1 --rounds 5

Generates a corpus of ImageNet-sized JPEGs (500x375, quality 90, smooth textures plus
grain, about as large on disk as ImageNet's), then times in one run:
  train  the ImageNet training pipeline of the variant's config (decode fused with the
         inception crop, flip, bicubic resize, MixUp/CutMix on half-batches, RandAugment
         with the variant's layers/magnitude, normalise), batches of --batch;
  eval   the config's evaluation pipeline at the variant's test size (resize_crop_32
         for NFNets; the PIL side always does resize_crop_32);
  and the same steps written straightforwardly with PIL and NumPy (PIL decodes the whole
  JPEG, crops, flips and resizes; NumPy mixes; PIL's ImageOps/ImageEnhance/transforms do
  RandAugment), one image at a time in one Python thread. Both training pipelines deliver
  uint8 batches (normalised on the device); both eval pipelines deliver normalised
  float32, as the eval view keeps the bicubic overshoot.

Each pipeline is timed in --rounds interleaved rounds (tf, PIL, tf, PIL, ...) and the
median round is reported, with the range of the per-round speed-ups.
"Per core" = images per CPU-second of this process (user + system time from getrusage),
so that a multi-threaded tf.data pipeline and a single-threaded PIL loop are compared on
the same footing. Also prints the cores needed to feed one accelerator running the
variant's train step at 32 images/device (the paper's V100 figure for F0, 56.7 ms/step,
unless --step-ms is given). A script, not a test: CI never runs it.

The config is ``config.imagenet_config(--variant)`` (its data fields: image sizes,
evaluation view, MixUp/CutMix, RandAugment), or the experiment given with --config;
the data source is replaced by an image folder holding the generated corpus.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import tempfile
import time
from typing import Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from nfnet_jax import cli, data
from nfnet_jax import config as config_lib
from nfnet_jax.data import folder

# NFNet-F0 training step on a V100 at 32 images/device, in ms: arXiv 2102.06171, table 3.
PAPER_V100_F0_MS = 56.7


def make_corpus(
  root: str, num_images: int, *, size=(500, 375), classes: int = 8, seed: int = 0
) -> float:
  """Writes root/<class>/<i>.jpg; returns the mean file size in KB."""
  rng = np.random.default_rng(seed)
  w, h = size
  total = 0
  for i in range(num_images):
    low = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
    grain = rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    path = os.path.join(root, f'class{i % classes}', f'{i:05d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, 'JPEG', quality=90)
    total += os.path.getsize(path)
  return total / num_images / 1024


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _time_batches(batches, num_batches: int, batch: int) -> dict:
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  n = num_batches * batch
  return {
    'images': n,
    'wall_s': wall,
    'cpu_s': cpu,
    'images_per_s': n / wall,
    'images_per_cpu_s': n / cpu,
  }


def _median_run(runs: list[dict]) -> dict:
  """The round with the median images per CPU-second."""
  return sorted(runs, key=lambda r: r['images_per_cpu_s'])[len(runs) // 2]


# ---------------------------------------------------------------------------------------
# The straightforward PIL + NumPy implementation of the same steps.
# ---------------------------------------------------------------------------------------


def _pil_inception_crop(img: Image.Image, rng, size: int) -> Image.Image:
  w, h = img.size
  for _ in range(10):
    area = rng.uniform(0.08, 1.0) * w * h
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
      return img.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC)
  side = int(min(w, h) * size / (size + 32))
  x, y = (w - side) // 2, (h - side) // 2
  return img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)


def _pil_randaugment(img: Image.Image, rng, layers: int, magnitude: float) -> Image.Image:
  m = magnitude / 10
  fill = (128, 128, 128)
  sign = lambda: 1 if rng.random() < 0.5 else -1  # noqa: E731
  for _ in range(layers):
    op = rng.integers(16)
    if op == 0:
      img = ImageOps.autocontrast(img)
    elif op == 1:
      img = ImageOps.equalize(img)
    elif op == 2:
      img = ImageOps.invert(img)
    elif op == 3:
      img = img.rotate(sign() * m * 30, resample=Image.NEAREST, fillcolor=fill)
    elif op == 4:
      img = ImageOps.posterize(img, int(m * 4))
    elif op == 5:
      img = ImageOps.solarize(img, int(m * 256))
    elif 6 <= op <= 9:
      enhancer = (
        ImageEnhance.Color,
        ImageEnhance.Contrast,
        ImageEnhance.Brightness,
        ImageEnhance.Sharpness,
      )[op - 6]
      img = enhancer(img).enhance(m * 1.8 + 0.1)
    elif op in (10, 11):
      s = sign() * m * 0.3
      coeffs = (1, s, 0, 0, 1, 0) if op == 10 else (1, 0, 0, s, 1, 0)
      img = img.transform(img.size, Image.AFFINE, coeffs, Image.NEAREST, fillcolor=fill)
    elif op in (12, 13):
      t = sign() * m * 100
      coeffs = (1, 0, t, 0, 1, 0) if op == 12 else (1, 0, 0, 0, 1, t)
      img = img.transform(img.size, Image.AFFINE, coeffs, Image.NEAREST, fillcolor=fill)
    elif op == 14:
      a = np.array(img)
      pad = int(m * 40)
      cy, cx = rng.integers(a.shape[0]), rng.integers(a.shape[1])
      a[max(cy - pad, 0) : cy + pad, max(cx - pad, 0) : cx + pad] = 128
      img = Image.fromarray(a)
    else:
      a = np.array(img).astype(np.int32)
      a = np.where(a < 128, np.minimum(a + int(m * 110), 255), a)
      img = Image.fromarray(a.astype(np.uint8))
  return img


def _pil_mix(images: np.ndarray, labels: np.ndarray, rng, alpha: float, num_classes: int):
  n = len(images)
  onehot = np.eye(num_classes, dtype=np.float32)[labels]
  half = n // 2
  partner, partner_y = images[::-1], onehot[::-1]
  out, out_y = images.copy(), onehot.copy()
  lam = rng.beta(alpha, alpha)
  out[:half] = lam * images[:half] + (1 - lam) * partner[:half]
  out_y[:half] = lam * onehot[:half] + (1 - lam) * partner_y[:half]
  h, w = images.shape[1:3]
  for i in range(half, n):
    ratio = np.sqrt(1 - rng.uniform())
    bh, bw = int(h * ratio), int(w * ratio)
    cy, cx = rng.integers(h), rng.integers(w)
    y0, y1 = np.clip([cy - bh // 2, cy + bh // 2], 0, h)
    x0, x1 = np.clip([cx - bw // 2, cx + bw // 2], 0, w)
    out[i, y0:y1, x0:x1] = partner[i, y0:y1, x0:x1]
    frac = (y1 - y0) * (x1 - x0) / (h * w)
    out_y[i] = (1 - frac) * onehot[i] + frac * partner_y[i]
  return out, out_y


def pil_train_batches(
  paths,
  labels,
  *,
  batch: int,
  num_batches: int,
  size: int,
  alpha: float,
  layers: int,
  magnitude: float,
  num_classes: int,
):
  rng = np.random.default_rng(0)
  k = 0
  for _ in range(num_batches):
    images, ys = [], []
    for _ in range(batch):
      with Image.open(paths[k % len(paths)]) as f:
        img = _pil_inception_crop(f.convert('RGB'), rng, size)
      if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
      images.append(np.asarray(img, np.float32))
      ys.append(labels[k % len(paths)])
      k += 1
    mixed, soft = _pil_mix(np.stack(images), np.array(ys), rng, alpha, num_classes)
    out = []
    for a in mixed:
      img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
      out.append(np.asarray(_pil_randaugment(img, rng, layers, magnitude)))
    # uint8, like the tf.data pipeline's training batches (both normalise on the device).
    yield np.stack(out), soft


def pil_eval_batches(paths, *, batch: int, num_batches: int, size: int):
  mean, std = np.float32(data.MEAN_RGB), np.float32(data.STDDEV_RGB)
  k = 0
  for _ in range(num_batches):
    out = []
    for _ in range(batch):
      with Image.open(paths[k % len(paths)]) as f:
        img = f.convert('RGB').resize((size + 32, size + 32), Image.BICUBIC)
      out.append(np.asarray(img, np.float32)[16 : 16 + size, 16 : 16 + size])
      k += 1
    yield (np.stack(out) - mean) / std


# ---------------------------------------------------------------------------------------


def run(
  variant: str = 'F0',
  num_images: int = 256,
  batch: int = 32,
  num_batches: int = 12,
  threads: int = 0,
  step_ms: float = 0.0,
  workdir: str | None = None,
  rounds: int = 3,
  config: ml_collections.ConfigDict | None = None,
) -> dict:
  """Times every pipeline `rounds` times, interleaved (tf, PIL, tf, PIL, ...), so that a
  change in the machine's load affects both sides of each comparison alike.

  ``config`` is an experiment config whose data fields to time (its model's variant
  names the result); None: ``config.imagenet_config(variant)``.
  """
  if config is None:
    config = config_lib.imagenet_config(variant)
  else:
    variant = config.model.kwargs.get('variant', variant)
  root = workdir or tempfile.mkdtemp(prefix='nfnet_throughput_')
  kb = make_corpus(root, num_images)
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  cfg.update(name='folder', folder=root, shuffle_buffer=num_images, threadpool_size=threads)
  info = data.dataset_info(cfg)  # scans (decodes) the corpus once, outside the timing
  index = folder.load_index(root)
  paths, labels = list(index.files['train']), index.labels['train']
  warmup = 2  # batches: tracing, autotuning, first file reads
  total = warmup + num_batches

  def tf_eval():
    while True:  # one pass over the corpus is shorter than the timed batches
      yield from data.eval_iterator(cfg, split='train', per_device_batch=batch, local_devices=1)

  pipelines = {
    'tf_train': lambda: data.train_iterator(cfg, per_device_batch=batch, local_devices=1, seed=0),
    'pil_train': lambda: pil_train_batches(
      paths,
      labels,
      batch=batch,
      num_batches=total,
      size=cfg.image_size,
      alpha=cfg.mixup_alpha,
      layers=cfg.randaug_layers,
      magnitude=cfg.randaug_magnitude,
      num_classes=info.num_classes,
    ),
    'tf_eval': tf_eval,
    'pil_eval': lambda: pil_eval_batches(
      paths, batch=batch, num_batches=total, size=cfg.eval_image_size
    ),
  }
  results = {
    'variant': variant,
    'mean_jpeg_kb': kb,
    'cpus': os.cpu_count(),
    'machine': platform.processor() or platform.machine(),
    'train_size': cfg.image_size,
    'eval_size': cfg.eval_image_size,
    'randaug': (cfg.randaug_layers, cfg.randaug_magnitude),
  }
  runs = {name: [] for name in pipelines}
  for _ in range(rounds):
    for name, make in pipelines.items():
      # A fresh iterator per round, closed before the next pipeline is timed: a live
      # tf.data iterator keeps filling its buffers on background threads, which would
      # charge its work to the other pipeline's timing.
      it = iter(make())
      for _ in range(warmup):
        next(it)
      runs[name].append(_time_batches(it, num_batches, batch))
      del it
      gc.collect()
  for name in pipelines:
    results[name] = _median_run(runs[name])
  for kind in ('train', 'eval'):
    ratios = sorted(
      t['images_per_cpu_s'] / p['images_per_cpu_s']
      for t, p in zip(runs[f'tf_{kind}'], runs[f'pil_{kind}'], strict=True)
    )
    results[f'{kind}_speedup'] = {
      'median': ratios[len(ratios) // 2],
      'min': ratios[0],
      'max': ratios[-1],
    }
  ms = step_ms or PAPER_V100_F0_MS
  needed = 32 / (ms / 1000)
  results['feed'] = {
    'step_ms': ms,
    'images_per_s_needed': needed,
    'cores_needed_tf': needed / results['tf_train']['images_per_cpu_s'],
    'cores_needed_pil': needed / results['pil_train']['images_per_cpu_s'],
  }
  return results


def define_flags(values: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config whose data fields to time, e.g. '
    'experiments/nfnet.py:F0 (default: the ImageNet config of --variant).',
    flag_values=values,
  )
  flags.DEFINE_string(
    'variant',
    'F0',
    'Model variant whose ImageNet config to time (without --config).',
    flag_values=values,
  )
  flags.DEFINE_integer('images', 256, 'JPEGs in the generated corpus', flag_values=values)
  flags.DEFINE_integer('batch', 32, 'Images per batch.', flag_values=values)
  flags.DEFINE_integer('batches', 12, 'timed batches per pipeline and round', flag_values=values)
  flags.DEFINE_integer(
    'rounds', 3, 'interleaved timing rounds; the median round is reported', flag_values=values
  )
  flags.DEFINE_integer(
    'threads', 0, 'tf.data private thread pool (0: TF default = all cores)', flag_values=values
  )
  flags.DEFINE_float(
    'step_ms',
    0.0,
    f'train step to feed at 32 img/device (default: paper V100 F0, {PAPER_V100_F0_MS} ms)',
    flag_values=values,
  )


def _throughput_cli(args: flags.FlagValues, positional: list[str]) -> None:
  del positional  # cli.run refuses positional arguments
  r = run(
    args.variant,
    args.images,
    args.batch,
    args.batches,
    args.threads,
    args.step_ms,
    rounds=args.rounds,
    config=args.config,
  )
  print(
    f'{r["variant"]} (train {r["train_size"]} px, RandAugment {r["randaug"]}, eval '
    f'{r["eval_size"]} px): {r["cpus"]} CPUs ({r["machine"]}), 500x375 JPEGs of '
    f'{r["mean_jpeg_kb"]:.0f} KB'
  )
  print(f'{"pipeline":<10} {"img/s":>8} {"img/s/core":>11} {"wall s":>7} {"cpu s":>7}')
  for name in ('tf_train', 'pil_train', 'tf_eval', 'pil_eval'):
    x = r[name]
    print(
      f'{name:<10} {x["images_per_s"]:8.1f} {x["images_per_cpu_s"]:11.1f} '
      f'{x["wall_s"]:7.2f} {x["cpu_s"]:7.2f}'
    )
  for kind in ('train', 'eval'):
    x = r[f'{kind}_speedup']
    print(
      f'{kind} speed-up per core vs PIL: {x["median"]:.2f}x median of {args.rounds} '
      f'interleaved rounds (min {x["min"]:.2f}x, max {x["max"]:.2f}x)'
    )
  f = r['feed']
  print(
    f'feeding a {f["step_ms"]} ms step at 32 img/device = {f["images_per_s_needed"]:.0f} '
    f'img/s needs {f["cores_needed_tf"]:.1f} cores (tf.data) vs '
    f'{f["cores_needed_pil"]:.1f} (PIL)'
  )


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_throughput_cli, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
