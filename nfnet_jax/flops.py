"""Analytic parameter and multiply-accumulate counts (paper table 3 / spec section 1).

Counted from the same BlockSpecs that build the model, layer by layer, without
tracing anything, so `count_flops('F7', 608)` is instant. The tests check the
result against Haiku's actual parameter tree and against the paper's tables.
"""
import dataclasses
import math
from typing import Optional

from nfnet_jax import nfnet


@dataclasses.dataclass(frozen=True)
class Cost:
  params: int
  macs: int

  def __add__(self, other: 'Cost') -> 'Cost':
    return Cost(self.params + other.params, self.macs + other.macs)


def _out_size(size: int, stride: int) -> int:
  return math.ceil(size / stride)           # SAME padding


def conv_cost(size: int, in_ch: int, out_ch: int, kernel: int = 3,
              stride: int = 1, groups: int = 1) -> tuple[Cost, int]:
  """A WSConv2D: weight + gain + bias; MACs at the output resolution."""
  out = _out_size(size, stride)
  weights = kernel * kernel * (in_ch // groups) * out_ch
  return Cost(params=weights + 2 * out_ch, macs=out * out * weights), out


def linear_cost(in_ch: int, out_ch: int) -> Cost:
  return Cost(params=in_ch * out_ch + out_ch, macs=in_ch * out_ch)


def count_flops(variant: str = 'F0', image_size: Optional[int] = None,
                num_classes: int = 1000, width: float = 1.0, se_ratio: float = 0.5,
                final_conv_mult: int = 2, final_conv_ch: Optional[int] = None,
                use_two_convs: bool = True, group_size: int = 128) -> Cost:
  """Parameters and multiply-accumulates of one forward pass of one image.

  `image_size` defaults to the variant's test size (the paper's convention).
  Elementwise work (activations, pooling, the SE gate product) is not counted,
  as in the paper.
  """
  size = image_size or nfnet.variant_params(variant)['test_imsize']
  stem_ch, specs = nfnet.block_specs(variant, width, group_size=group_size)
  total = Cost(0, 0)
  in_ch = 3
  for ch, stride in [(16, 2), (32, 1), (64, 1), (stem_ch, 2)]:
    cost, size = conv_cost(size, in_ch, ch, 3, stride)
    total, in_ch = total + cost, ch
  for spec in specs:
    mid, groups = spec.bottleneck_ch, spec.groups
    out_size = _out_size(size, spec.stride)
    total += conv_cost(size, spec.in_ch, mid, 1)[0]                 # conv0
    total += conv_cost(size, mid, mid, 3, spec.stride, groups)[0]   # conv1
    if use_two_convs:
      total += conv_cost(out_size, mid, mid, 3, 1, groups)[0]       # conv1b
    total += conv_cost(out_size, mid, spec.out_ch, 1)[0]            # conv2
    if spec.stride > 1 or spec.in_ch != spec.out_ch:                # conv_shortcut
      total += conv_cost(out_size, spec.in_ch, spec.out_ch, 1)[0]
    hidden = max(1, int(spec.out_ch * se_ratio))
    total += linear_cost(spec.out_ch, hidden) + linear_cost(hidden, spec.out_ch)
    total += Cost(params=1, macs=0)                                 # skip_gain
    size = out_size
  final_ch = final_conv_ch or final_conv_mult * specs[-1].out_ch
  total += conv_cost(size, specs[-1].out_ch, final_ch, 1)[0]
  total += linear_cost(final_ch, num_classes)
  return total
