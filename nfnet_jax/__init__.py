"""nfnet_jax: NFNets (Brock et al. 2021) in JAX/Haiku.

The public API; each name lives in the module that implements that part of the paper.
"""

# First, before JAX is imported: a command-line tool re-executes itself here with huge
# pages for its large host buffers (see `hostmem`); a library import returns at once.
from nfnet_jax import hostmem as _hostmem

_hostmem.reexec_with_huge_pages()

from nfnet_jax.losses import softmax_cross_entropy
from nfnet_jax.models import (
  NF_REGNET_VARIANTS,
  NF_RESNET_VARIANTS,
  NFNET_VARIANTS,
  BNResNet,
  NFBlock,
  NFNet,
  NFRegNet,
  NFResNet,
  SqueezeExcite,
  WSConv2D,
  count_flops,
  scaled_activation,
)
from nfnet_jax.optim import (
  adaptive_grad_clip,
  agc_mask,
  ema_update,
  sgd_agc,
  warmup_cosine_schedule,
  weight_decay_mask,
)
from nfnet_jax.sam import sam_value_and_grad
from nfnet_jax.weights import load_pretrained

__all__ = [
  'NFNet',
  'NFBlock',
  'NFNET_VARIANTS',
  'NFResNet',
  'NF_RESNET_VARIANTS',
  'NFRegNet',
  'NF_REGNET_VARIANTS',
  'BNResNet',
  'WSConv2D',
  'SqueezeExcite',
  'scaled_activation',
  'count_flops',
  'adaptive_grad_clip',
  'agc_mask',
  'weight_decay_mask',
  'sgd_agc',
  'warmup_cosine_schedule',
  'ema_update',
  'sam_value_and_grad',
  'softmax_cross_entropy',
  'load_pretrained',
  'train_and_evaluate',
  'evaluate',
]


def __getattr__(name):
  # The training loop pulls in TensorFlow and Orbax: import it only when asked.
  if name in ('train_and_evaluate', 'evaluate'):
    from nfnet_jax import train  # pylint: disable=g-import-not-at-top

    return getattr(train, name)
  if name == 'data':  # tf.data input pipelines: TensorFlow, likewise on demand
    import nfnet_jax.data  # pylint: disable=g-import-not-at-top

    return nfnet_jax.data
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
