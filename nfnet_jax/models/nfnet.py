"""NFNet-F0..F7 and F0+..F7+ (Brock, De, Smith, Simonyan 2021, arXiv 2102.06171).

Module and parameter names follow DeepMind's released Haiku checkpoints exactly
(`NFNet/~/stem_conv0`, `NFNet/~/nf_block_3/~/conv1b`, ...), so those parameters
drop in unchanged.
"""

from typing import Any, Callable, Optional

import haiku as hk
import jax

from nfnet_jax.models import family, layers

# Paper table 1 / section 4: width, depth, resolutions, RandAugment, dropout.
_F_DEPTHS = {f'F{k}': [1 * (k + 1), 2 * (k + 1), 6 * (k + 1), 3 * (k + 1)] for k in range(8)}
_F_SIZES = {  # variant: (train size, test size, RandAugment magnitude, dropout)
  'F0': (192, 256, 5, 0.2),
  'F1': (224, 320, 10, 0.3),
  'F2': (256, 352, 10, 0.4),
  'F3': (320, 416, 15, 0.4),
  'F4': (384, 512, 15, 0.5),
  'F5': (416, 544, 15, 0.5),
  'F6': (448, 576, 15, 0.5),
  'F7': (480, 608, 15, 0.5),
}
_WIDTHS = [256, 512, 1536, 1536]
_PLUS_WIDTHS = [384, 768, 2048, 2048]  # "+" variants: wider, same depths.
_STRIDES = [1, 2, 2, 2]

NFNET_VARIANTS = {}
for _name, (_train, _test, _ra_mag, _drop) in _F_SIZES.items():
  for _suffix, _widths in (('', _WIDTHS), ('+', _PLUS_WIDTHS)):
    NFNET_VARIANTS[_name + _suffix] = dict(
      width=_widths,
      depth=_F_DEPTHS[_name],
      train_imsize=_train,
      test_imsize=_test,
      randaug_layers=4,
      randaug_magnitude=_ra_mag,
      drop_rate=_drop,
    )


# The stem: four 3x3 convs (total stride 4); the last one's width is half the first
# stage's, and no activation follows it (the first block applies it, scaled by beta).
def stem_layout(stem_ch: int) -> list[tuple[int, int]]:
  """(channels, stride) of each stem conv."""
  return [(16, 2), (32, 1), (64, 1), (stem_ch, 2)]


def block_specs(
  variant: str = 'F0',
  width: float = 1.0,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
  group_size: int = 128,
  expansion: float = 0.5,
) -> tuple[int, list[layers.BlockSpec]]:
  """Returns (stem output channels, one BlockSpec per block)."""
  params = family.lookup_variant(NFNET_VARIANTS, 'NFNet', variant)
  widths = [int(w * width) for w in params['width']]
  stem_ch = widths[0] // 2
  specs, in_ch = [], stem_ch
  for place in layers.signal_plan(params['depth'], alpha, stochdepth_rate):
    out_ch = widths[place.stage]
    # "Big width": the bottleneck is sized from the block's output channels,
    # rounded down to whole groups of `group_size` channels.
    groups = max(1, int(out_ch * expansion) // group_size)
    specs.append(
      layers.BlockSpec(
        in_ch=in_ch,
        out_ch=out_ch,
        stride=_STRIDES[place.stage] if place.index_in_stage == 0 else 1,
        bottleneck_ch=groups * group_size,
        groups=groups,
        beta=place.beta,
        stochdepth_rate=place.stochdepth_rate,
      )
    )
    in_ch = out_ch
  return stem_ch, specs


class NFBlock(hk.Module):
  """Normalizer-free bottleneck block with two grouped 3x3 convs (paper fig. 6)."""

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    bottleneck_ch: int,
    groups: int,
    stride: int = 1,
    beta: float = 1.0,
    alpha: float = 0.2,
    se_ratio: float = 0.5,
    stochdepth_rate: float = 0.0,
    activation: Callable = layers.scaled_activation('gelu'),
    use_two_convs: bool = True,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.activation = activation
    self.stochdepth_rate = stochdepth_rate
    self.use_projection = stride > 1 or in_ch != out_ch
    self.conv0 = layers.WSConv2D(bottleneck_ch, 1, name='conv0')
    self.conv1 = layers.WSConv2D(
      bottleneck_ch, 3, stride=stride, feature_group_count=groups, name='conv1'
    )
    self.conv1b = (
      layers.WSConv2D(bottleneck_ch, 3, feature_group_count=groups, name='conv1b')
      if use_two_convs
      else None
    )
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.conv_shortcut = (
      layers.WSConv2D(out_ch, 1, name='conv_shortcut') if self.use_projection else None
    )
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
    return layers.residual_merge(out, shortcut, self.alpha, self.stochdepth_rate, is_training)


class NFNet(hk.Module):
  """Normalizer-free network, F-series.

  Call as `model(x, is_training)` with NHWC float images; returns a dict with
  `logits` [B, num_classes] and `pool` [B, C] (the pooled features). With
  `return_metrics=True` it also returns per-block signal statistics under
  `block_{i}`: `avg_sq_mean`, `avg_var` (of the block's output) and
  `res_avg_var` (of the residual branch before skip_gain and alpha).

  `remat=True` recomputes each block's activations in the backward pass
  (`layers.apply_blocks`): less memory, the same parameters, outputs and gradients.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'F0',
    width: float = 1.0,
    se_ratio: float = 0.5,
    alpha: float = 0.2,
    stochdepth_rate: float = 0.1,
    drop_rate: Optional[float] = None,
    activation: str = 'gelu',
    fc_init: Optional[hk.initializers.Initializer] = None,
    final_conv_mult: int = 2,
    final_conv_ch: Optional[int] = None,
    use_two_convs: bool = True,
    name: str = 'NFNet',
    *,
    group_size: int = 128,
    remat: bool = False,
  ):
    super().__init__(name=name)
    self.num_classes = num_classes
    self.variant = variant
    self.remat = remat
    params = family.lookup_variant(NFNET_VARIANTS, 'NFNet', variant)
    self.drop_rate = params['drop_rate'] if drop_rate is None else drop_rate
    self.activation = layers.scaled_activation(activation)
    stem_ch, self.specs = block_specs(variant, width, alpha, stochdepth_rate, group_size)

    self.stem = [
      layers.WSConv2D(ch, 3, stride=s, name=f'stem_conv{i}')
      for i, (ch, s) in enumerate(stem_layout(stem_ch))
    ]
    self.blocks = [
      NFBlock(
        spec.in_ch,
        spec.out_ch,
        spec.bottleneck_ch,
        spec.groups,
        stride=spec.stride,
        beta=spec.beta,
        alpha=alpha,
        se_ratio=se_ratio,
        stochdepth_rate=spec.stochdepth_rate,
        activation=self.activation,
        use_two_convs=use_two_convs,
      )
      for spec in self.specs
    ]
    final_ch = final_conv_ch or final_conv_mult * self.specs[-1].out_ch
    self.final_conv = layers.WSConv2D(final_ch, 1, name='final_conv')
    self.fc = hk.Linear(
      num_classes, with_bias=True, w_init=fc_init or hk.initializers.RandomNormal(0.01)
    )

  def __call__(
    self, x: jax.Array, is_training: bool, return_metrics: bool = False
  ) -> dict[str, Any]:
    layers.check_image_batch(x, 'NFNet')
    outputs = {}
    out = x
    for i, conv in enumerate(self.stem):
      out = conv(out)
      if i < len(self.stem) - 1:
        out = self.activation(out)
    out = layers.apply_blocks(
      self.blocks, out, is_training, outputs if return_metrics else None, remat=self.remat
    )
    out = self.activation(self.final_conv(out))
    return layers.classifier_head(out, self.fc, self.drop_rate, is_training, outputs)


def count_flops(
  variant: str = 'F0',
  image_size: Optional[int] = None,
  num_classes: int = 1000,
  width: float = 1.0,
  se_ratio: float = 0.5,
  final_conv_mult: int = 2,
  final_conv_ch: Optional[int] = None,
  use_two_convs: bool = True,
  group_size: int = 128,
  **unused_kwargs,
) -> family.Cost:
  """Parameters and multiply-accumulates of one forward pass of one image, counted from
  the same BlockSpecs that build the model. `image_size` defaults to the variant's test
  size (the paper's convention). Arguments that change no shape (alpha, dropout, ...)
  are accepted and ignored."""
  stem_ch, specs = block_specs(variant, width, group_size=group_size)
  size = image_size or NFNET_VARIANTS[variant]['test_imsize']
  total, in_ch = family.Cost(0, 0), 3
  for ch, stride in stem_layout(stem_ch):
    cost, size = family.conv_cost(size, in_ch, ch, 3, stride)
    total, in_ch = total + cost, ch
  for spec in specs:
    cost, size = family.bottleneck_cost(
      spec, size, second_3x3=use_two_convs, se_hidden=max(1, int(spec.out_ch * se_ratio))
    )
    total += cost
  last_ch = specs[-1].out_ch
  final_ch = final_conv_ch or final_conv_mult * last_ch
  return total + family.head_cost(size, last_ch, num_classes, final_ch)


FAMILY = family.Family(
  name='NFNet',
  title='NFNet',
  model=NFNet,
  variants=NFNET_VARIANTS,
  prefixes=('', 'NFNet-'),
  # DeepMind's released arguments, with the paper's training value of stochastic
  # depth (0.25, section 3); drop_rate None = the variant's.
  defaults=dict(
    width=1.0,
    se_ratio=0.5,
    alpha=0.2,
    stochdepth_rate=0.25,
    drop_rate=None,
    activation='gelu',
    final_conv_mult=2,
    use_two_convs=True,
    group_size=128,
  ),
  root='NFNet',
  block='nf_block',
  eval_view='resize_crop_32',
  count_flops=count_flops,
)
