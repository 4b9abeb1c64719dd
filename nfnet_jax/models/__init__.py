"""The model families (one file each), the batch-normalised baselines, their shared layers,
and the registry."""

from nfnet_jax.models.bn_resnet import BN_RESNET_VARIANTS, BNResNet
from nfnet_jax.models.family import Cost, Family
from nfnet_jax.models.layers import SqueezeExcite, WSConv2D, scaled_activation
from nfnet_jax.models.nf_regnet import NF_REGNET_VARIANTS, NFRegNet
from nfnet_jax.models.nf_resnet import NF_RESNET_VARIANTS, NFResNet
from nfnet_jax.models.nfnet import NFNET_VARIANTS, NFBlock, NFNet
from nfnet_jax.models.registry import (
  BASELINES,
  DTYPES,
  FAMILIES,
  build_model,
  build_model_with_state,
  canonical_name,
  count_flops,
  count_params,
  family_of_root,
  family_of_variant,
  get_family,
  mixed_precision_policy,
  model_signature,
  model_variant,
  resolve,
  variant_params,
)

__all__ = [
  'Cost',
  'Family',
  'SqueezeExcite',
  'WSConv2D',
  'scaled_activation',
  'NF_REGNET_VARIANTS',
  'NFRegNet',
  'NF_RESNET_VARIANTS',
  'NFResNet',
  'NFNET_VARIANTS',
  'NFBlock',
  'NFNet',
  'BN_RESNET_VARIANTS',
  'BNResNet',
  'BASELINES',
  'DTYPES',
  'FAMILIES',
  'build_model',
  'build_model_with_state',
  'canonical_name',
  'count_flops',
  'count_params',
  'get_family',
  'family_of_root',
  'family_of_variant',
  'mixed_precision_policy',
  'model_signature',
  'model_variant',
  'resolve',
  'variant_params',
]
