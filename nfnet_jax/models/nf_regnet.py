"""NF-RegNet-B0..B8: normalizer-free RegNets (Brock, De, Smith 2021, arXiv 2101.08692,
section 5 and appendix; DeepMind's released nf_regnet.py).

Module and parameter names (Haiku's defaults for the classes below):

  NF_RegNet/~/initial_conv                       3x3 stride-2 WS conv (w, gain, bias)
  NF_RegNet/~/nf_block                   first block (no `_0`): `skip_gain`
  NF_RegNet/~/nf_block_{k}/~/conv0       1x1 to the bottleneck width
  NF_RegNet/~/nf_block_{k}/~/conv1       grouped 3x3, carries the stride
  NF_RegNet/~/nf_block_{k}/~/squeeze_excite/~/linear, .../~/linear_1
  NF_RegNet/~/nf_block_{k}/~/conv2       1x1 to the block's output channels
  NF_RegNet/~/nf_block_{k}/~/conv_shortcut          projection blocks only
  NF_RegNet/~/final_conv                         1x1 to int(1280 * ch / 440)
  NF_RegNet/~/linear                             classifier (w, b), w init zeros

These are the names of DeepMind's released Haiku code (deepmind-research/nfnets,
nf_regnet.py: top module `NF_RegNet`, block class `NFBlock`, hence `nf_block`),
checked against it line by line; tests/models/test_nf_regnet.py pins every path
and shape. Our block class is `NFRegNetBlock` (NFNet's is `NFBlock`) and names its
instances `nf_block` so the paths match.

Shapes that fix the parameter count (NF-RegNet-B0, 1000 classes: 8,595,372):
stage widths int(w * 0.75) ([36, 78, 156, 330] for B0), stem int(w0 * 0.75) = 36;
bottleneck = int(in_ch * expansion) rounded DOWN to a whole number of groups of 8
(the very first block, expansion 1: 36 -> 32); the SE hidden width is
int(bottleneck * se_ratio); every block whose stride is 2 or whose channels
change has a `conv_shortcut`, the very first block (36 -> 36, stride 2) included;
final conv 1280 * 330 // 440 = 960 channels.
"""

from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax.models import family, layers

# Widths (before x width), depths, train/test sizes and dropout of DeepMind's released
# NF-RegNet table (nf_regnet.py).
_B_WIDTHS = {
  'B0': [48, 104, 208, 440],
  'B1': [48, 104, 208, 440],
  'B2': [56, 112, 232, 488],
  'B3': [56, 128, 248, 528],
  'B4': [64, 144, 288, 616],
  'B5': [80, 168, 336, 704],
  'B6': [88, 184, 376, 792],
  'B7': [96, 208, 416, 880],
  'B8': [104, 232, 456, 968],
}
_B_DEPTHS = {
  'B0': [1, 3, 6, 6],
  'B1': [2, 4, 7, 7],
  'B2': [2, 4, 8, 8],
  'B3': [2, 5, 9, 9],
  'B4': [2, 6, 11, 11],
  'B5': [3, 7, 14, 14],
  'B6': [3, 8, 16, 16],
  'B7': [4, 10, 19, 19],
  'B8': [4, 11, 22, 22],
}
_B_SIZES = {  # variant: (train size, test size, dropout)
  'B0': (192, 224, 0.2),
  'B1': (224, 256, 0.2),
  'B2': (240, 272, 0.3),
  'B3': (288, 320, 0.3),
  'B4': (320, 384, 0.4),
  'B5': (384, 456, 0.4),
  'B6': (448, 528, 0.5),
  'B7': (512, 600, 0.5),
  'B8': (600, 672, 0.5),
}
NF_REGNET_VARIANTS = {
  name: dict(
    width=_B_WIDTHS[name],
    depth=_B_DEPTHS[name],
    train_imsize=train,
    test_imsize=test,
    drop_rate=drop,
  )
  for name, (train, test, drop) in _B_SIZES.items()
}


def block_specs(
  variant: str = 'B0',
  width: float = 0.75,
  expansion: float = 2.25,
  group_size: int = 8,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
) -> tuple[int, list[layers.BlockSpec]]:
  """Returns (stem output channels, one BlockSpec per block)."""
  params = family.lookup_variant(NF_REGNET_VARIANTS, 'NF-RegNet', variant)
  widths = [int(w * width) for w in params['width']]
  stem_ch = widths[0]
  specs, in_ch = [], stem_ch
  for place in layers.signal_plan(params['depth'], alpha, stochdepth_rate):
    # The bottleneck is sized from the block's INPUT channels (inverted bottleneck, as
    # EfficientNet/RegNet), the very first block unexpanded, then rounded down to
    # whole groups.
    mid = int(in_ch * (1.0 if place.index == 0 else expansion))
    groups = max(1, mid // group_size)
    out_ch = widths[place.stage]
    specs.append(
      layers.BlockSpec(
        in_ch=in_ch,
        out_ch=out_ch,
        stride=2 if place.index_in_stage == 0 else 1,
        bottleneck_ch=groups * group_size,
        groups=groups,
        beta=place.beta,
        stochdepth_rate=place.stochdepth_rate,
      )
    )
    in_ch = out_ch
  return stem_ch, specs


def final_conv_channels(last_ch: int) -> int:
  """EfficientNet-B0's 1280-channel head, scaled with the last stage's width."""
  return 1280 * last_ch // 440


class NFRegNetBlock(hk.Module):
  """Normalizer-free inverted bottleneck: 1x1, grouped 3x3, SE, 1x1."""

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
    activation: Callable = layers.scaled_activation('silu'),
    name: Optional[str] = None,
  ):
    # The released NF_RegNet's block class is `NFBlock`: its checkpoints say `nf_block`.
    super().__init__(name=name or 'nf_block')
    self.stride, self.beta, self.alpha = stride, beta, alpha
    self.activation = activation
    self.stochdepth_rate = stochdepth_rate
    self.use_projection = stride > 1 or in_ch != out_ch
    self.conv0 = layers.WSConv2D(bottleneck_ch, 1, name='conv0')
    self.conv1 = layers.WSConv2D(
      bottleneck_ch, 3, stride=stride, feature_group_count=groups, name='conv1'
    )
    # Created between conv1 and conv2 so the module order reads as the data flow.
    self.se = (
      layers.SqueezeExcite(bottleneck_ch, bottleneck_ch, se_ratio=se_ratio)
      if se_ratio and se_ratio > 0
      else None
    )
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.conv_shortcut = (
      layers.WSConv2D(out_ch, 1, name='conv_shortcut') if self.use_projection else None
    )

  def __call__(self, x: jax.Array, is_training: bool):
    act = self.activation
    out = act(x) * self.beta
    # Downsampling shortcut as the released nf_regnet.py's NFBlock (and NFNet's):
    # 2x2 average pool, then the 1x1 projection.
    shortcut = layers.pooled_shortcut(x, out, self.stride, self.conv_shortcut)
    out = self.conv0(out)
    out = self.conv1(act(out))
    if self.se is not None:
      out = 2 * self.se(out) * out
    out = self.conv2(act(out))
    return layers.residual_merge(out, shortcut, self.alpha, self.stochdepth_rate, is_training)


class NFRegNet(hk.Module):
  """Normalizer-free RegNet, B-series.

  Call as `model(x, is_training)` with NHWC float images; returns a dict with
  `logits` [B, num_classes] and `pool` [B, C]; with `return_metrics=True` also
  `block_{i}`: `avg_sq_mean`, `avg_var` (block output) and `res_avg_var`
  (residual branch before skip_gain and alpha), as NFNet. `remat=True`: as NFNet.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'B0',
    width: float = 0.75,
    expansion: float = 2.25,
    group_size: int = 8,
    se_ratio: float = 0.5,
    alpha: float = 0.2,
    stochdepth_rate: float = 0.1,
    drop_rate: Optional[float] = None,
    activation: str = 'silu',
    fc_init: Optional[hk.initializers.Initializer] = None,
    name: str = 'NF_RegNet',
    *,
    remat: bool = False,
  ):
    super().__init__(name=name)
    self.num_classes = num_classes
    self.variant = variant
    self.remat = remat
    params = family.lookup_variant(NF_REGNET_VARIANTS, 'NF-RegNet', variant)
    self.drop_rate = params['drop_rate'] if drop_rate is None else drop_rate
    self.activation = layers.scaled_activation(activation)
    stem_ch, self.specs = block_specs(variant, width, expansion, group_size, alpha, stochdepth_rate)
    self.initial_conv = layers.WSConv2D(stem_ch, 3, stride=2, name='initial_conv')
    self.blocks = [
      NFRegNetBlock(
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
      )
      for spec in self.specs
    ]
    self.final_conv = layers.WSConv2D(
      final_conv_channels(self.specs[-1].out_ch), 1, name='final_conv'
    )
    self.fc = hk.Linear(num_classes, with_bias=True, w_init=fc_init or jnp.zeros)

  def __call__(
    self, x: jax.Array, is_training: bool, return_metrics: bool = False
  ) -> dict[str, Any]:
    layers.check_image_batch(x, 'NF_RegNet')
    outputs = {}
    # No activation after the stem: the first block applies it, scaled by beta.
    out = self.initial_conv(x)
    out = layers.apply_blocks(
      self.blocks, out, is_training, outputs if return_metrics else None, remat=self.remat
    )
    out = self.activation(self.final_conv(out))
    return layers.classifier_head(out, self.fc, self.drop_rate, is_training, outputs)


def count_flops(
  variant: str = 'B0',
  image_size: Optional[int] = None,
  num_classes: int = 1000,
  width: float = 0.75,
  expansion: float = 2.25,
  group_size: int = 8,
  se_ratio: float = 0.5,
  **unused_kwargs,
) -> family.Cost:
  """Parameters and multiply-accumulates of one image's forward pass at `image_size`
  (default: the variant's test size), from the same BlockSpecs that build the model
  (conventions of `family.conv_cost`)."""
  stem_ch, specs = block_specs(variant, width, expansion, group_size)
  size = image_size or NF_REGNET_VARIANTS[variant]['test_imsize']
  total, size = family.conv_cost(size, 3, stem_ch, 3, 2)
  for spec in specs:
    se_hidden = max(1, int(spec.bottleneck_ch * se_ratio)) if se_ratio and se_ratio > 0 else 0
    cost, size = family.bottleneck_cost(spec, size, se_hidden=se_hidden, se_on_bottleneck=True)
    total += cost
  last_ch = specs[-1].out_ch
  return total + family.head_cost(size, last_ch, num_classes, final_conv_channels(last_ch))


FAMILY = family.Family(
  name='NFRegNet',
  title='NF-RegNet',
  model=NFRegNet,
  variants=NF_REGNET_VARIANTS,
  prefixes=('NF-RegNet-', ''),
  # DeepMind's released NF_RegNet arguments; drop_rate None = the variant's.
  defaults=dict(
    width=0.75,
    expansion=2.25,
    group_size=8,
    se_ratio=0.5,
    alpha=0.2,
    stochdepth_rate=0.1,
    drop_rate=None,
    activation='silu',
  ),
  root='NF_RegNet',
  block='nf_block',
  eval_view='crop_resize',
  count_flops=count_flops,
)
