"""Building a model from a config: the families by name, and mixed precision."""
from typing import Any

import haiku as hk
import jax
import jmp
import ml_collections

from nfnet_jax import nf_regnet
from nfnet_jax import nf_resnet
from nfnet_jax import nfnet

# One entry per model family; the config's `model.name` picks it.
MODEL_FAMILIES: dict[str, type] = {
    'NFNet': nfnet.NFNet,
    'NFResNet': nf_resnet.NFResNet,
    'NFRegNet': nf_regnet.NFRegNet,
}

# Each family's variant table; variant names never repeat across families, so a
# variant ('F0', 'ResNet50', 'B0') says which family a weights file is for.
FAMILY_VARIANTS: dict[str, dict] = {
    'NFNet': nfnet.NFNET_VARIANTS,
    'NFResNet': nf_resnet.NF_RESNET_VARIANTS,
    'NFRegNet': nf_regnet.NF_REGNET_VARIANTS,
}
# The top-level Haiku module of each family (the released code's names).
ROOT_MODULES: dict[str, str] = {'NFNet': 'NFNet', 'NFResNet': 'NF_ResNet',
                                'NFRegNet': 'NF_RegNet'}

DTYPES = ('float32', 'bfloat16')


def _family(name: str) -> type:
  if name not in MODEL_FAMILIES:
    raise ValueError(f'Unknown model family {name!r}; valid: {", ".join(MODEL_FAMILIES)}.')
  return MODEL_FAMILIES[name]


def family_of_variant(variant: str) -> str:
  """'NFNet', 'NFResNet' or 'NFRegNet': the family whose table has `variant`."""
  for family, table in FAMILY_VARIANTS.items():
    if variant in table:
      return family
  listed = '; '.join(f'{family}: {", ".join(table)}'
                     for family, table in FAMILY_VARIANTS.items())
  raise ValueError(f'Unknown variant {variant!r}; valid variants are {listed}.')


def variant_params(variant: str) -> dict:
  """The variant's row of its family's table (depths, widths, train/test sizes, ...)."""
  return FAMILY_VARIANTS[family_of_variant(variant)][variant]


def mixed_precision_policy(dtype: str) -> jmp.Policy:
  """float32 master params; compute in `dtype`; float32 outputs (logits for the loss)."""
  if dtype not in DTYPES:
    raise ValueError(f'Unknown dtype {dtype!r}; valid: {", ".join(DTYPES)}.')
  return jmp.get_policy(f'params=float32,compute={dtype},output=float32')


def build_model(model_config: ml_collections.ConfigDict, num_classes: int,
                dtype: str = 'float32') -> hk.Transformed:
  """A pure (init, apply) pair: apply(params, rng, images, is_training, ...) -> dict.

  With dtype='bfloat16', haiku casts the float32 parameters and the inputs to
  bfloat16 inside the model and its output back to float32 (the paper's
  mixed-precision recipe); gradients then flow back to float32 parameters.
  """
  family = _family(model_config.name)
  kwargs = dict(model_config.kwargs)
  policy = mixed_precision_policy(dtype)

  def forward(images, is_training: bool, return_metrics: bool = False):
    with hk.mixed_precision.push_policy(family, policy):
      model = family(num_classes, **kwargs)
      return model(images, is_training, return_metrics=return_metrics)

  return hk.transform(forward)


def model_signature(model_config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What identifies a parameter tree: a checkpoint of another signature won't fit."""
  return {'family': model_config.name, 'num_classes': int(num_classes),
          **{k: v for k, v in dict(model_config.kwargs).items()}}


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))

