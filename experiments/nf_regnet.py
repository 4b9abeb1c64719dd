r"""NF-RegNet-B0..B8 on ImageNet: the recipe of DeepMind's released NF-RegNet experiment.

Command (on every host of a Cloud TPU slice; launch/train_tpu.sh and docs/tpu.md do it):
  python -m nfnet_jax.train --config experiments/nf_regnet.py:B0 --workdir gs://BUCKET/b0 \
      --distributed --config.data.data_dir=gs://BUCKET/tensorflow_datasets
  launch/train_tpu.sh --project P --zone Z --workdir gs://BUCKET/b0 \
      --config experiments/nf_regnet.py:B0 --tfds-data-dir gs://BUCKET/tensorflow_datasets

Expected result: no ImageNet figure is stated here: this config has not been run to
completion on ImageNet. arXiv 2101.08692 compares NF-RegNets with EfficientNets of equal
FLOPs (the NFNet paper's table 3 lists EfficientNet-B0 at 77.1 ... B7 at 84.7 top-1).
Read `eval_ema_top1` in <workdir>/metrics.jsonl.

Measured here instead, the same recipe scaled down to the embedded digits (`:digits`,
see `digits_config`):
  python -m nfnet_jax.train --config experiments/nf_regnet.py:digits --workdir workdirs/b0
Expected (measured 2026-11-23, 2-core CPU, float32): eval_ema_top1 0.978 (352 of 360 test
digits; raw the same) after 898 steps, about 2 minutes.

The recipe, as DeepMind's released code sets it (deepmind-research/nfnets,
experiment_nf_regnets.py, which differs from the NFNet recipe in experiments/nfnet.py):
  * global batch 1024, 360 epochs (450,410 steps), float32 (no bf16);
  * SGD, Nesterov momentum 0.9; lr 0.4 NOT scaled by the batch; 5 warmup epochs from 0,
    then cosine down to 0.001 (not 0);
  * coupled weight decay per variant, 5e-5 + 1e-5 x level: B0 5e-5, B1 6e-5, ... B5 1e-4
    (the released table stops at B5; B6..B8 continue its stated rule: 1.1e-4, 1.2e-4,
    1.3e-4); never on gains, biases or skip_gain;
  * NO adaptive gradient clipping;
  * label smoothing 0.1; EMA of the params, decay min(0.99999, (1 + t) / (10 + t));
  * MixUp (alpha 0.2) on half of each device batch, CutMix on the other half; no
    RandAugment;
  * the model's released defaults: width 0.75, expansion 2.25, group size 8, SE 0.5,
    alpha 0.2, stochastic depth 0.1, SiLU, per-variant dropout;
  * train at the variant's train size, evaluate at its test size with the released
    code's `crop_resize` view (centre square of side min(H, W) * S / (S + 32), resized).

Data: TFDS imagenet2012 5.x in data_dir (docs/imagenet.md). Any other TFDS dataset or an
image folder works too: --config.data.name=tfds:NAME or folder (--config.data.folder=...).
"""

from nfnet_jax import config as config_lib
from nfnet_jax import models


def weight_decay(variant: str) -> float:
  """The released per-variant rule, 5e-5 + 1e-5 x level (B0 -> 5e-5, B5 -> 1e-4)."""
  level = int(variant[1:])
  return round(5e-5 + 1e-5 * level, 10)


def get_config(arg='B0'):
  if arg == 'digits':
    return digits_config()
  _, variant = models.resolve(arg or 'B0')  # 'NF-RegNet-B3' or 'B3' -> 'B3'
  # The released NF_RegNet defaults (width 0.75, expansion 2.25, group size 8, SE 0.5,
  # alpha 0.2, stochastic depth 0.1, SiLU, the variant's dropout), ImageNet at the
  # variant's train/test sizes.
  config = config_lib.imagenet_config(variant)
  config.dtype = 'float32'
  config.label_smoothing = 0.1
  config.ema_max_decay = 0.99999
  config.data.update(eval_preprocess='crop_resize', mixup_alpha=0.2, cutmix=True, randaug_layers=0)
  config.train.update(
    batch_size=1024, num_epochs=360.0, log_every_steps=100, eval_every_steps=10_000
  )
  config.optimizer.update(
    base_lr=0.4,
    scale_by_batch=False,
    warmup_epochs=5.0,
    end_lr=0.001,
    momentum=0.9,
    nesterov=True,
    weight_decay=weight_decay(variant),
    clipping=0.0,
  )
  config.checkpoint.update(every_steps=2000, max_to_keep=3)
  return config


def digits_config():
  """The recipe above, scaled down to run here: a quarter-width B0 on the embedded
  digits at 32 px, batch 64 with the learning rate scaled to it (0.4 x 64 / 1024),
  40 epochs; everything else (no AGC, MixUp + CutMix, cosine to lr/400, B0's weight
  decay and dropout, EMA, float32) as for ImageNet."""
  config = get_config('B0')
  config.model.kwargs.width = 0.25
  config.data.update(name='digits', image_size=32, eval_image_size=0)
  config.train.update(batch_size=64, num_epochs=40.0, log_every_steps=25, eval_every_steps=300)
  config.optimizer.update(base_lr=0.4 * 64 / 1024, end_lr=0.001 * 64 / 1024)
  config.eval.update(splits='test', batch_size=120)
  config.checkpoint.update(every_steps=300, max_to_keep=2)
  return config
