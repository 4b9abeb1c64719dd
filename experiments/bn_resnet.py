r"""BN-ResNet-50..: the batch-normalised baseline, with the released code's 90-epoch recipe.

Command (on every host of a Cloud TPU slice; launch/train_tpu.sh and docs/tpu.md do it):
  python -m nfnet_jax.train --config experiments/bn_resnet.py:BN-ResNet50 \
      --workdir gs://BUCKET/bn_r50 --distributed \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result: this config has not been run on ImageNet. A pre-activation ResNet-50
trained with this plain 90-epoch recipe reaches about 76-77% top-1; read `eval_top1` and
`eval_ema_top1` in <workdir>/metrics.jsonl.

Measured here instead, the same recipe scaled down to the embedded digits (`:digits`,
see `digits_config`):
  python -m nfnet_jax.train --config experiments/bn_resnet.py:digits --workdir workdirs/bn_r50
Expected (measured 2026-11-30, 2-core CPU shared with other jobs, float32): eval_top1
0.978 (352 of 360 test digits; EMA the same) after 898 steps, in about 4 minutes.

The recipe is DeepMind's released ImageNet ResNet experiment (deepmind-research/nfnets,
experiment.py, its default config: model 'ResNet', which_norm 'BatchNorm'):
  * global batch 1024, 90 epochs (112,602 steps), float32;
  * SGD, Nesterov momentum 0.9; lr 0.1 x batch / 256 (0.4), 5 warmup epochs from 0, then
    cosine to 0;
  * weight decay 1e-4, coupled, never on batch norm's scale and offset or on biases (the
    released `_make_opt` leaves 'scale', 'offset', 'b' out); no gradient clipping;
  * label smoothing 0.1; inception crop and flip only (no MixUp, CutMix or RandAugment);
    224 px for training and evaluation, with the released `crop_resize` view;
  * the released ResNet defaults (models/bn_resnet.py): pre-activation (V2), width 4,
    batch norm decay 0.9 and eps 1e-5, ReLU, no dropout;
  * batch statistics per device (`bn_sync='none'`: the release leaves
    `cross_replica_axis` commented out); the moving statistics are averaged over the
    devices each step (steps.make_train_step);
  * the released config keeps no EMA; ours always does (of the parameters and of the
    moving statistics, as the release's EMA code does, decay up to 0.9999) and reports
    both `eval_top1` and `eval_ema_top1`.
"""

from nfnet_jax import config as config_lib


def get_config(arg='BN-ResNet50'):
  if arg == 'digits':
    return digits_config()
  variant = arg or 'BN-ResNet50'
  config = config_lib.imagenet_config(variant)  # unknown variant -> lists them all
  config.dtype = 'float32'
  config.label_smoothing = 0.1
  config.ema_max_decay = 0.9999
  config.model.bn_sync = 'none'
  config.data.update(eval_preprocess='crop_resize', mixup_alpha=0.0, cutmix=False, randaug_layers=0)
  config.train.update(batch_size=1024, num_epochs=90.0, log_every_steps=100, eval_every_steps=5000)
  config.optimizer.update(
    name='sgd_agc',
    lr_schedule='cosine',
    base_lr=0.1,
    scale_by_batch=True,
    warmup_epochs=5.0,
    end_lr=0.0,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-4,
    clipping=0.0,
  )
  config.checkpoint.update(every_steps=2000, max_to_keep=3)
  return config


def digits_config():
  """The recipe above, scaled down to run here: a sixteenth-width BN-ResNet-50 (width
  0.25: stages of 16, 32, 64, 128 channels) on the embedded digits at 32 px, batch 64
  (lr 0.1 x 64 / 256), 40 epochs; everything else as for ImageNet."""
  config = get_config('BN-ResNet50')
  config.model.kwargs.width = 0.25
  config.data.update(name='digits', image_size=32, eval_image_size=0)
  config.train.update(batch_size=64, num_epochs=40.0, log_every_steps=25, eval_every_steps=300)
  config.eval.update(splits='test', batch_size=120)
  config.checkpoint.update(every_steps=300, max_to_keep=2)
  return config
