"""nfnet_jax: NFNets (Brock et al. 2021) in JAX/Haiku.

The public API; each name lives in the module that implements that part of the paper.
"""
from nfnet_jax.flops import count_flops
from nfnet_jax.layers import SqueezeExcite, WSConv2D, scaled_activation
from nfnet_jax.nfnet import NFNET_VARIANTS, NFBlock, NFNet

__all__ = [
    'NFNet', 'NFBlock', 'NFNET_VARIANTS', 'WSConv2D', 'SqueezeExcite',
    'scaled_activation', 'count_flops',
]
