"""NFNet-F0..F7 and F0+..F7+ (Brock, De, Smith, Simonyan 2021, arXiv 2102.06171).

Module and parameter names follow DeepMind's released Haiku checkpoints exactly
(`NFNet/~/stem_conv0`, `NFNet/~/nf_block_3/~/conv1b`, ...), so those parameters
drop in unchanged.
"""
import dataclasses
from typing import Any, Callable, Optional

import haiku as hk
import jax

from nfnet_jax import layers

# Paper table 1 / section 4: width, depth, resolutions, RandAugment, dropout.
_F_DEPTHS = {f'F{k}': [1 * (k + 1), 2 * (k + 1), 6 * (k + 1), 3 * (k + 1)] for k in range(8)}
_F_SIZES = {  # variant: (train size, test size, RandAugment magnitude, dropout)
    'F0': (192, 256, 5, 0.2), 'F1': (224, 320, 10, 0.3), 'F2': (256, 352, 10, 0.4),
    'F3': (320, 416, 15, 0.4), 'F4': (384, 512, 15, 0.5), 'F5': (416, 544, 15, 0.5),
    'F6': (448, 576, 15, 0.5), 'F7': (480, 608, 15, 0.5),
}
_WIDTHS = [256, 512, 1536, 1536]
_PLUS_WIDTHS = [384, 768, 2048, 2048]   # "+" variants: wider, same depths.

NFNET_VARIANTS = {}
for _name, (_train, _test, _ra_mag, _drop) in _F_SIZES.items():
  for _suffix, _widths in (('', _WIDTHS), ('+', _PLUS_WIDTHS)):
    NFNET_VARIANTS[_name + _suffix] = dict(
        width=_widths, depth=_F_DEPTHS[_name], train_imsize=_train, test_imsize=_test,
        randaug_layers=4, randaug_magnitude=_ra_mag, drop_rate=_drop)


def lookup_variant(table: dict, family: str, variant: str) -> dict:
  """`table[variant]`, or an error that lists the valid variants (every family's table)."""
  if variant not in table:
    raise ValueError(f'Unknown {family} variant {variant!r}; valid variants: '
                     f'{", ".join(table)}.')
  return table[variant]


def variant_params(variant: str) -> dict:
  return lookup_variant(NFNET_VARIANTS, 'NFNet', variant)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Everything that fixes one NFBlock's shapes and signal bookkeeping."""
  in_ch: int
  out_ch: int
  stride: int
  bottleneck_ch: int
  groups: int
  beta: float
  stochdepth_rate: float


def block_specs(variant: str = 'F0', width: float = 1.0, alpha: float = 0.2,
                stochdepth_rate: float = 0.1, group_size: int = 128,
                expansion: float = 0.5) -> tuple[int, list[BlockSpec]]:
  """Returns (stem output channels, one BlockSpec per block)."""
  params = variant_params(variant)
  widths = [int(w * width) for w in params['width']]
  stem_ch = widths[0] // 2
  num_blocks = sum(params['depth'])
  specs, in_ch, index = [], stem_ch, 0
  expected_std = 1.0
  for stage_width, stage_depth, stage_stride in zip(widths, params['depth'], [1, 2, 2, 2]):
    for block_index in range(stage_depth):
      # "Big width": the bottleneck is sized from the block's output channels,
      # rounded down to whole groups of `group_size` channels.
      groups = max(1, int(stage_width * expansion) // group_size)
      specs.append(BlockSpec(
          in_ch=in_ch, out_ch=stage_width,
          stride=stage_stride if block_index == 0 else 1,
          bottleneck_ch=groups * group_size, groups=groups,
          beta=1.0 / expected_std,
          stochdepth_rate=stochdepth_rate * index / num_blocks))
      # Signal bookkeeping (2101.08692 section 4): each residual branch adds
      # alpha^2 variance; a transition block's shortcut restarts at variance 1.
      if block_index == 0:
        expected_std = 1.0
      expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
      in_ch, index = stage_width, index + 1
  return stem_ch, specs


class NFBlock(hk.Module):
  """Normalizer-free bottleneck block with two grouped 3x3 convs (paper fig. 6)."""

  def __init__(self, in_ch: int, out_ch: int, bottleneck_ch: int, groups: int,
               stride: int = 1, beta: float = 1.0, alpha: float = 0.2,
               se_ratio: float = 0.5, stochdepth_rate: float = 0.0,
               activation: Callable = layers.scaled_activation('gelu'),
               use_two_convs: bool = True, name: Optional[str] = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.activation = activation
    self.stochdepth_rate = stochdepth_rate
    self.use_projection = stride > 1 or in_ch != out_ch
    self.conv0 = layers.WSConv2D(bottleneck_ch, 1, name='conv0')
    self.conv1 = layers.WSConv2D(bottleneck_ch, 3, stride=stride,
                                 feature_group_count=groups, name='conv1')
    self.conv1b = (layers.WSConv2D(bottleneck_ch, 3, feature_group_count=groups,
                                   name='conv1b') if use_two_convs else None)
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.conv_shortcut = (layers.WSConv2D(out_ch, 1, name='conv_shortcut')
                          if self.use_projection else None)
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio=se_ratio)

  def __call__(self, x: jax.Array, is_training: bool):
    act = self.activation
    # beta = 1 / expected std of x: the branch sees a unit-variance input.
    out = act(x) * self.beta
    shortcut = layers.pooled_shortcut(x, out, self.stride, self.conv_shortcut)
    out = self.conv0(out)
    out = self.conv1(act(out))
    if self.conv1b is not None:
      out = self.conv1b(act(out))
    out = self.conv2(act(out))
    # x2 keeps the variance of the gated branch at init (sigmoid(0) = 1/2).
    out = 2 * self.se(out) * out
    return layers.residual_merge(out, shortcut, self.alpha, self.stochdepth_rate,
                                 is_training)


class NFNet(hk.Module):
  """Normalizer-free network, F-series.

  Call as `model(x, is_training)` with NHWC float images; returns a dict with
  `logits` [B, num_classes] and `pool` [B, C] (the pooled features). With
  `return_metrics=True` it also returns per-block signal statistics under
  `block_{i}`: `avg_sq_mean`, `avg_var` (of the block's output) and
  `res_avg_var` (of the residual branch before skip_gain and alpha).
  """

  def __init__(self, num_classes: int, variant: str = 'F0', width: float = 1.0,
               se_ratio: float = 0.5, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: Optional[float] = None,
               activation: str = 'gelu',
               fc_init: Optional[hk.initializers.Initializer] = None,
               final_conv_mult: int = 2, final_conv_ch: Optional[int] = None,
               use_two_convs: bool = True, name: str = 'NFNet', *,
               group_size: int = 128):
    super().__init__(name=name)
    self.num_classes = num_classes
    self.variant = variant
    params = variant_params(variant)
    self.drop_rate = params['drop_rate'] if drop_rate is None else drop_rate
    self.activation = layers.scaled_activation(activation)
    stem_ch, self.specs = block_specs(variant, width, alpha, stochdepth_rate, group_size)

    # Stem: four 3x3 convs, total stride 4, no activation after the last one
    # (the first block applies it, scaled by its beta).
    self.stem = [layers.WSConv2D(ch, 3, stride=s, name=f'stem_conv{i}')
                 for i, (ch, s) in enumerate([(16, 2), (32, 1), (64, 1), (stem_ch, 2)])]
    self.blocks = [
        NFBlock(spec.in_ch, spec.out_ch, spec.bottleneck_ch, spec.groups,
                stride=spec.stride, beta=spec.beta, alpha=alpha, se_ratio=se_ratio,
                stochdepth_rate=spec.stochdepth_rate, activation=self.activation,
                use_two_convs=use_two_convs)
        for spec in self.specs]
    final_ch = final_conv_ch or final_conv_mult * self.specs[-1].out_ch
    self.final_conv = layers.WSConv2D(final_ch, 1, name='final_conv')
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or hk.initializers.RandomNormal(0.01))

  def __call__(self, x: jax.Array, is_training: bool,
               return_metrics: bool = False) -> dict[str, Any]:
    layers.check_image_batch(x, 'NFNet')
    outputs = {}
    out = x
    for i, conv in enumerate(self.stem):
      out = conv(out)
      if i < len(self.stem) - 1:
        out = self.activation(out)
    out = layers.apply_blocks(self.blocks, out, is_training,
                              outputs if return_metrics else None)
    out = self.activation(self.final_conv(out))
    return layers.classifier_head(out, self.fc, self.drop_rate, is_training, outputs)
