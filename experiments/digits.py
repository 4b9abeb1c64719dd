r"""Quickstart: a narrow NFNet-F0 trained on scikit-learn's handwritten digits, on CPU.

The real recipe (AGC, Nesterov SGD, warmup + cosine, EMA, label smoothing,
stochastic depth, dropout) and the real model (F0's 12 blocks, 1/8 of the
channels) on real scans that ship with scikit-learn: no network needed.

Command:
  python -m nfnet_jax.train --config experiments/digits.py --workdir workdirs/digits

Expected result (2 CPU cores, see the README's table): eval_ema_top1 >= 0.97
(about 0.98-0.99) on the 360 test digits, in a few minutes.

Knowledge distillation (`config.distill`, nfnet_jax/distill.py), a wide teacher into a
narrow student, with the student trained both ways on the same steps and seed:

  # the teacher: 1/4 of F0's channels, the quickstart's recipe otherwise
  python -m nfnet_jax.train --config experiments/digits.py:wide --workdir workdirs/digits_wide
  # the student alone: 1/16 of the channels, 20 epochs
  python -m nfnet_jax.train --config experiments/digits.py:narrow --workdir workdirs/digits_narrow
  # the same student taught by the teacher's exported EMA weights
  python -m nfnet_jax.train --config experiments/digits.py:distill \
      --workdir workdirs/digits_distill \
      --config.distill.teacher=workdirs/digits_wide/params_ema.npz
"""

from nfnet_jax import config as config_lib

ARGS = ('', 'wide', 'narrow', 'distill')


def get_config(arg=None):
  arg = arg or ''
  if arg not in ARGS:
    raise ValueError(
      f'Unknown experiments/digits.py argument {arg!r}; valid: none, wide, narrow, distill.'
    )
  config = config_lib.base_config()
  config.dtype = 'float32'  # bfloat16 is emulated, hence slow, on CPU
  config.model.kwargs.update(width=0.125, group_size=16, drop_rate=0.2)
  config.data.image_size = 32
  config.train.update(batch_size=64, num_epochs=40.0, log_every_steps=25, eval_every_steps=300)
  # Small batches want a larger clipping threshold (paper fig. 3): 0.01 is tuned
  # for batch 4096.
  config.optimizer.update(base_lr=0.4, warmup_epochs=2.0, clipping=0.04)
  config.eval.update(splits='test', batch_size=120)
  config.checkpoint.update(every_steps=300, max_to_keep=2)
  if arg == 'wide':
    config.model.kwargs.width = 0.25
  elif arg in ('narrow', 'distill'):
    # Half the quickstart's channels and half its steps: a student with room to gain.
    config.model.kwargs.width = 0.0625
    config.train.num_epochs = 20.0
  if arg == 'distill':
    config.distill.update(teacher='workdirs/digits_wide/params_ema.npz', weight=0.5)
  return config
