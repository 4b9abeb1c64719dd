"""NF-ResNet-50..600: normalizer-free pre-activation ResNets (Brock, De, Smith 2021,
arXiv 2101.08692, section 4 and appendix).

Module and parameter names (Haiku's defaults for the classes below):

  NF_ResNet/~/initial_conv                       7x7 stride-2 WS conv (w, gain, bias)
  NF_ResNet/~/nf_res_block                   first block (no `_0`): `skip_gain`
  NF_ResNet/~/nf_res_block_{k}/~/conv0       1x1
  NF_ResNet/~/nf_res_block_{k}/~/conv1       3x3, carries the stride
  NF_ResNet/~/nf_res_block_{k}/~/conv2       1x1 to the block's output channels
  NF_ResNet/~/nf_res_block_{k}/~/conv_shortcut          projection blocks only
  NF_ResNet/~/nf_res_block_{k}/~/squeeze_excite/~/linear, .../~/linear_1
                                                 only with use_se=True
  NF_ResNet/~/linear                             classifier (w, b)

These are the names of DeepMind's released Haiku code (deepmind-research/nfnets,
nf_resnet.py: top module `NF_ResNet`, block class `NFResBlock`, classifier an
unnamed `hk.Linear`), checked against it line by line; tests/models/test_nf_resnet.py
pins every path and shape. The SE block's two layers are unnamed `hk.Linear`s in
a `SqueezeExcite`, hence `linear` and `linear_1`.

Parameter count: NF-ResNet-50 at 1000 classes with the defaults (width 4, no SE)
has 25,557,048 parameters: a BN ResNet-50's 25,557,032 (each WS conv's gain and
bias take the place of a BatchNorm's scale and offset) plus one `skip_gain` per
block (16).
"""

from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax.models import family, layers

# Blocks per stage (2101.08692, appendix; DeepMind's nf_resnet.py). Stage output channels
# are `width` (the same for every depth) x the width multiplier (default 4); the
# bottleneck is a quarter of that.
# Every variant trains and evaluates at 224 px (the released ResNet experiment's size).
_DEPTHS = {
  'ResNet50': [3, 4, 6, 3],
  'ResNet101': [3, 4, 23, 3],
  'ResNet152': [3, 8, 36, 3],
  'ResNet200': [3, 24, 36, 3],
  'ResNet288': [24] * 4,
  'ResNet600': [50] * 4,
}
NF_RESNET_VARIANTS = {
  name: dict(width=[64, 128, 256, 512], depth=depth, train_imsize=224, test_imsize=224)
  for name, depth in _DEPTHS.items()
}
_STRIDES = [1, 2, 2, 2]  # the stem's max-pool already halved the input
BOTTLENECK_RATIO = 0.25


def block_specs(
  variant: str = 'ResNet50', width: float = 4, alpha: float = 0.2, stochdepth_rate: float = 0.1
) -> tuple[int, list[layers.BlockSpec]]:
  """Returns (stem output channels, one BlockSpec per block); groups are always 1.

  The stem has 16 x width channels (64 at the default width 4), a quarter of the
  first stage's, so narrow test models shrink it too.
  """
  params = family.lookup_variant(NF_RESNET_VARIANTS, 'NF-ResNet', variant)
  widths = [int(w * width) for w in params['width']]
  stem_ch = int(16 * width)
  specs, in_ch = [], stem_ch
  for place in layers.signal_plan(params['depth'], alpha, stochdepth_rate):
    out_ch = widths[place.stage]
    specs.append(
      layers.BlockSpec(
        in_ch=in_ch,
        out_ch=out_ch,
        stride=_STRIDES[place.stage] if place.index_in_stage == 0 else 1,
        bottleneck_ch=max(1, int(out_ch * BOTTLENECK_RATIO)),
        groups=1,
        beta=place.beta,
        stochdepth_rate=place.stochdepth_rate,
      )
    )
    in_ch = out_ch
  return stem_ch, specs


class NFResBlock(hk.Module):
  """Normalizer-free pre-activation bottleneck block (1x1, strided 3x3, 1x1)."""

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    bottleneck_ch: int,
    stride: int = 1,
    beta: float = 1.0,
    alpha: float = 0.2,
    use_se: bool = False,
    se_ratio: float = 0.25,
    stochdepth_rate: float = 0.0,
    activation: Callable = layers.scaled_activation('relu'),
    skipinit_gain: hk.initializers.Initializer = jnp.zeros,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.stride, self.beta, self.alpha = stride, beta, alpha
    self.activation = activation
    self.stochdepth_rate = stochdepth_rate
    self.skipinit_gain = skipinit_gain
    self.conv0 = layers.WSConv2D(bottleneck_ch, 1, name='conv0')
    self.conv1 = layers.WSConv2D(bottleneck_ch, 3, stride=stride, name='conv1')
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.conv_shortcut = (
      layers.WSConv2D(out_ch, 1, stride=stride, name='conv_shortcut')
      if stride > 1 or in_ch != out_ch
      else None
    )
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio=se_ratio) if use_se else None

  def __call__(self, x: jax.Array, is_training: bool):
    act = self.activation
    out = act(x) * self.beta
    # The projection is a strided 1x1 conv of the pre-activated input (no
    # average pool, unlike NFNet).
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.conv0(out)
    out = self.conv1(act(out))
    out = self.conv2(act(out))
    if self.se is not None:
      out = 2 * self.se(out) * out
    return layers.residual_merge(
      out, shortcut, self.alpha, self.stochdepth_rate, is_training, skip_init=self.skipinit_gain
    )


class NFResNet(hk.Module):
  """Normalizer-free pre-activation ResNet.

  Call as `model(x, is_training)` with NHWC float images; returns a dict with
  `logits` [B, num_classes] and `pool` [B, C]; with `return_metrics=True` also
  `block_{i}`: `avg_sq_mean`, `avg_var` (block output) and `res_avg_var`
  (residual branch before skip_gain and alpha), as NFNet. `remat=True`: as NFNet.

  `use_se=True` adds squeeze-excite (hidden width `se_ratio` x the block's output
  channels) after conv2 of every block; off by default, as released.
  `drop_rate=None` means no dropout: NF-ResNets have no per-variant dropout rate
  (the released class looks one up and so crashes with its own defaults).
  The arguments are the released `NF_ResNet`'s, with the same defaults otherwise.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'ResNet50',
    width: float = 4,
    alpha: float = 0.2,
    stochdepth_rate: float = 0.1,
    drop_rate: Optional[float] = None,
    activation: str = 'relu',
    fc_init: Optional[hk.initializers.Initializer] = None,
    skipinit_gain: hk.initializers.Initializer = jnp.zeros,
    use_se: bool = False,
    se_ratio: float = 0.25,
    name: str = 'NF_ResNet',
    *,
    remat: bool = False,
  ):
    super().__init__(name=name)
    self.num_classes = num_classes
    self.variant = variant
    self.remat = remat
    self.drop_rate = 0.0 if drop_rate is None else drop_rate
    self.activation = layers.scaled_activation(activation)
    stem_ch, self.specs = block_specs(variant, width, alpha, stochdepth_rate)
    self.initial_conv = layers.WSConv2D(stem_ch, 7, stride=2, name='initial_conv')
    self.blocks = [
      NFResBlock(
        spec.in_ch,
        spec.out_ch,
        spec.bottleneck_ch,
        stride=spec.stride,
        beta=spec.beta,
        alpha=alpha,
        use_se=use_se,
        se_ratio=se_ratio,
        stochdepth_rate=spec.stochdepth_rate,
        activation=self.activation,
        skipinit_gain=skipinit_gain,
      )
      for spec in self.specs
    ]
    self.fc = hk.Linear(
      num_classes, with_bias=True, w_init=fc_init or hk.initializers.RandomNormal(0.01)
    )

  def __call__(
    self, x: jax.Array, is_training: bool, return_metrics: bool = False
  ) -> dict[str, Any]:
    layers.check_image_batch(x, 'NF_ResNet')
    outputs = {}
    # No activation in the stem: the first block applies it (pre-activation).
    out = self.initial_conv(x)
    out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    out = layers.apply_blocks(
      self.blocks, out, is_training, outputs if return_metrics else None, remat=self.remat
    )
    return layers.classifier_head(
      self.activation(out), self.fc, self.drop_rate, is_training, outputs
    )


def count_flops(
  variant: str = 'ResNet50',
  image_size: Optional[int] = None,
  num_classes: int = 1000,
  width: float = 4,
  use_se: bool = False,
  se_ratio: float = 0.25,
  **unused_kwargs,
) -> family.Cost:
  """Parameters and multiply-accumulates of one image's forward pass, from the same
  BlockSpecs that build the model (conventions of `family.conv_cost`)."""
  stem_ch, specs = block_specs(variant, width)
  size = image_size or NF_RESNET_VARIANTS[variant]['test_imsize']
  total, size = family.conv_cost(size, 3, stem_ch, 7, 2)
  size = family.out_size(size, 2)  # max-pool
  for spec in specs:
    se_hidden = max(1, int(spec.out_ch * se_ratio)) if use_se else 0
    cost, size = family.bottleneck_cost(spec, size, se_hidden=se_hidden)
    total += cost
  return total + family.head_cost(size, specs[-1].out_ch, num_classes)  # no final conv


FAMILY = family.Family(
  name='NFResNet',
  title='NF-ResNet',
  model=NFResNet,
  variants=NF_RESNET_VARIANTS,
  prefixes=('NF-', ''),
  # DeepMind's released NF_ResNet arguments (drop_rate 0.0: its ResNet experiment's).
  defaults=dict(
    width=4.0,
    alpha=0.2,
    stochdepth_rate=0.1,
    drop_rate=0.0,
    activation='relu',
    use_se=False,
    se_ratio=0.25,
  ),
  root='NF_ResNet',
  block='nf_res_block',
  eval_view='crop_resize',
  count_flops=count_flops,
)
