r"""NFNet-F0..F7 (and F0+..F7+) on ImageNet: the paper's published recipe.

Command (a Cloud TPU v3-32/v4-32 slice; see launch/ and docs/tpu.md):
  python -m nfnet_jax.train --config experiments/nfnet.py:F0 --workdir gs://BUCKET/f0 \
      --distributed --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result (paper table 3, ImageNet validation top-1 of the EMA params):
  F0 83.6, F1 84.7, F2 85.1, F3 85.7, F4 85.9, F5 86.0 (F5+SAM 86.3, F6+SAM 86.5).

SAM: `F6` trains with it (the paper reports F6 only with SAM), F5 with it when asked as
`F5+SAM` (`F6+SAM` is F6; SAM off for F6: --config.optimizer.sam_rho=0):
  python -m nfnet_jax.train --config experiments/nfnet.py:F5+SAM --workdir gs://BUCKET/f5sam \
      --distributed --config.data.data_dir=gs://BUCKET/tensorflow_datasets
The ascent gradient is taken on 20% of each device's batch and not synchronised across
devices (appendix A.4). The ImageNet rho of F5+SAM and F6+SAM is unpublished: SAM_RHO below
is 0.05, the one value the paper states (for fine-tuning after JFT-300M pre-training);
treat it as a hyperparameter to sweep on minival (--config.optimizer.sam_rho).

The recipe (arXiv 2102.06171 section 3 and appendix C): global batch 4096, 360
epochs (112,602 steps), SGD with Nesterov momentum 0.9, lr 0.1 x batch / 256 with 5
warmup epochs then cosine decay to 0, coupled weight decay 2e-5 (not on gains, biases, skip_gain),
AGC 0.01 on everything but the classifier weight, label smoothing 0.1,
stochastic depth 0.25, dropout per variant, EMA of the params, bf16 compute,
MixUp/CutMix + RandAugment(4 layers, per-variant magnitude), train at the
variant's train size and evaluate at its test size.

Data: TFDS imagenet2012 5.x prepared in data_dir (docs/imagenet.md says how). The
paper trains on all of train and reports validation; for model selection without
touching validation, train on train_minus_minival and evaluate minival:
  --config.data.train_split=train_minus_minival --config.eval.splits=minival
"""

from nfnet_jax import config as config_lib
from nfnet_jax import models

SAM_RHO = 0.05  # unpublished for ImageNet from scratch (module docstring)
SAM_SUFFIX = '+SAM'


def get_config(arg='F0'):
  # NFNet's released arguments (stochastic depth 0.25, the variant's dropout), ImageNet at
  # the variant's train/test sizes with resize_crop_32, MixUp + CutMix and the variant's
  # RandAugment (config_lib.imagenet_config); the schedule and optimizer below.
  arg = arg or 'F0'
  variant = arg.removesuffix(SAM_SUFFIX)
  config = config_lib.imagenet_config(variant)  # unknown variant -> lists them all
  if arg.endswith(SAM_SUFFIX) or models.resolve(variant)[1] == 'F6':
    config.optimizer.update(sam_rho=SAM_RHO, sam_ascent_fraction=0.2)
  config.train.update(batch_size=4096, num_epochs=360.0, log_every_steps=100, eval_every_steps=5000)
  config.optimizer.update(
    base_lr=0.1, warmup_epochs=5.0, weight_decay=2e-5, clipping=0.01, eps=1e-3
  )
  config.checkpoint.update(every_steps=1000, max_to_keep=3)
  return config
