"""The fields every experiment config has, with the published ImageNet recipe's values.

Each experiments/*.py file starts from `base_config()` and changes what differs,
so that a field that exists in one config exists in all (and a typo in an
override is an error everywhere). It lives in the library so that config files
import nothing but the installed package, whichever directory they are run from; the
tools that need a config without a file (the benchmarks) build it from here too.
"""

import ml_collections

from nfnet_jax import data, models


def model_config(variant: str) -> ml_collections.ConfigDict:
  """`name` and `kwargs` of `variant`'s family with its released defaults
  (`Family.defaults`) and the variant's dropout rate. An unknown variant lists all."""
  family, key = models.resolve(variant)
  kwargs = dict(variant=key, **family.defaults)
  if kwargs.get('drop_rate', 0.0) is None:
    kwargs['drop_rate'] = family.variants[key]['drop_rate']
  # remat: recompute each residual block's activations in the backward pass instead of
  # storing them; less memory for big variants, the same outputs and gradients.
  # bn_sync (batch-normalised models only): which devices share batch statistics,
  # 'none' (each its own), 'all' (the global batch) or 'tpu' (the TF TPU EfficientNet's
  # groups); see models/batchnorm.py. Like remat it changes no parameter, so both sit
  # beside `kwargs`, out of the model signature: weights load whatever their setting.
  bn_sync = kwargs.pop('bn_sync', 'none')
  return ml_collections.ConfigDict(
    dict(name=family.name, kwargs=kwargs, remat=False, bn_sync=bn_sync)
  )


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = 'bfloat16'  # compute dtype; params/optimizer stay float32
  config.num_devices = 0  # 0: every local device
  # How the per-device steps are mapped over the devices: 'shard_map' (jit of
  # jax.shard_map over a one-axis mesh) or the legacy 'pmap'; both run the same step
  # body and give the same results (parallel.py says why shard_map is the default).
  config.parallel = 'shard_map'
  config.label_smoothing = 0.1
  config.ema_max_decay = 0.99999  # EMA decay = min(this, (1 + step) / (10 + step))
  # Fine-tuning: weights to start from when the workdir has no checkpoint yet
  # (DeepMind's F{k}_haiku.npz, a converted .npz, or a run's params_ema.npz); a
  # classifier of another size (new classes) starts fresh.
  config.init_from = ''

  config.model = model_config('F0')

  config.data = data.default_data_config()

  config.train = ml_collections.ConfigDict(
    dict(
      batch_size=4096,  # global, over every device of every host
      num_epochs=360.0,
      num_steps=0,  # > 0 overrides num_epochs
      log_every_steps=100,
      eval_every_steps=5000,
      # Micro-batches per device per step: gradients are summed over them (lax.scan)
      # before the one cross-device mean, so the step equals one pass over the batch.
      grad_accum_steps=1,
    )
  )

  config.optimizer = ml_collections.ConfigDict(
    dict(
      name='sgd_agc',
      base_lr=0.1,  # per 256 examples: peak lr = 0.1 x batch / 256
      scale_by_batch=True,
      warmup_epochs=5.0,
      end_lr=0.0,  # where the cosine ends (absolute, not per 256)
      momentum=0.9,
      nesterov=True,
      weight_decay=2e-5,  # coupled; not on gains, biases, skip_gain
      clipping=0.01,  # AGC; 0 disables it
      eps=1e-3,
      # The learning-rate schedule: 'cosine' (warmup, then cosine to end_lr) or
      # 'exponential' (warmup, then x lr_decay_rate every lr_decay_epochs epochs,
      # staircase: the TF TPU EfficientNet's).
      lr_schedule='cosine',
      lr_decay_rate=0.97,
      lr_decay_epochs=2.4,
      # name='rmsprop' (TF1 RMSProp, optim.rmsprop_tf): decay and eps of the mean square;
      # `momentum` and `weight_decay` above (L2 on all but batch norm); nesterov unused.
      rms_decay=0.9,
      rms_eps=1e-3,
      # SAM (paper section 5.2 / table 3, F5+SAM and F6): 0 = off. The ascent gradient
      # is taken on this fraction of each device's batch and is not averaged across devices.
      sam_rho=0.0,
      sam_ascent_fraction=0.2,
    )
  )

  # Knowledge distillation (nfnet_jax/distill.py): teacher = a weights file of any NF family
  # ('' = off). The loss is (1 - weight) * CE(labels, student) + weight * T^2 *
  # CE(softmax(teacher / T), student / T) (Hinton et al. 2015, arXiv 1503.02531 section 2).
  # weight 0.5 weighs the two terms equally, as He et al. 2018 ("Bag of Tricks", arXiv
  # 1812.01187 section 5.4) do up to an overall factor 2. They use T = 20 on ImageNet's
  # 1000 classes (a ResNet-152-D teacher); the default T = 1 takes the teacher's
  # distribution as it is, since a large T flattens a few classes' (digits: 10) towards
  # uniform. The T^2 factor keeps the teacher term's gradient scale independent of T.
  config.distill = ml_collections.ConfigDict(dict(teacher='', weight=0.5, temperature=1.0))

  # eval.splits: what every evaluation reads, comma-separated: splits of the training
  # dataset ('test', 'validation', TFDS expressions such as 'train[:1%]') and the datasets
  # of data.sources.EVAL_DATASETS ('imagenet_v2', 'imagenet2012_real'). The first is
  # logged as eval_top1, eval_ema_top1, ...; each other as eval_<entry>/top1, ...
  config.eval = ml_collections.ConfigDict(dict(splits='test', batch_size=1000))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=3))
  # A jax.profiler trace of `num_steps` steps from `start_step` on process 0, written to
  # WORKDIR/profile (TensorBoard's profile tab, Perfetto); num_steps=0: no trace.
  config.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))
  # transfer_guard: an implicit host<->device copy inside the training loop is an error.
  config.debug = ml_collections.ConfigDict(dict(transfer_guard=False))
  return config


IMAGENET_TRAIN_EXAMPLES = 1_281_167


def imagenet_config(variant: str) -> ml_collections.ConfigDict:
  """`base_config()` for `variant` on ImageNet: its family's released model arguments,
  TFDS imagenet2012 at the variant's train/test sizes with the family's evaluation view,
  evaluation on validation, and the NFNet paper's augmentation (section 3: MixUp on half
  of each device batch, CutMix on the other half, then RandAugment with the variant's
  layers and magnitude where its table gives them). Each experiments/ file then sets its
  recipe (what differs in augmentation, schedule, optimizer)."""
  family, key = models.resolve(variant)  # unknown variant -> lists them all
  params = family.variants[key]
  config = base_config()
  config.model = model_config(variant)
  config.data.update(
    name='imagenet2012',
    data_dir='',  # TFDS data_dir (local or gs://); '' = TFDS default
    train_split='train',  # 'train_minus_minival' to select models on minival
    image_size=params['train_imsize'],
    eval_image_size=params['test_imsize'],
    eval_preprocess=family.eval_view,
    augment=True,
    mixup_alpha=0.2,
    cutmix=True,
    randaug_layers=params.get('randaug_layers', 0),
    randaug_magnitude=float(params.get('randaug_magnitude', 0.0)),
    shuffle_buffer=10_000,
    cache=False,
  )  # 150 GB: never cache ImageNet in host RAM
  # Add ',imagenet_v2,imagenet2012_real' to also evaluate those (docs/imagenet.md).
  config.eval.update(splits='validation', batch_size=1000)
  return config
