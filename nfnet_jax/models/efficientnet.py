"""EfficientNet-B0..B7 (Tan & Le 2019, arXiv 1905.11946): the batch-normalized baseline of
the NFNet paper's table 3 (arXiv 2102.06171).

As the official TensorFlow TPU code (tensorflow/tpu, models/official/efficientnet,
efficientnet_builder.py and efficientnet_model.py): a 3x3 stride-2 stem conv of 32
channels, seven stages of MBConv blocks (the B0 table below, 1905.11946 table 1), a 1x1
head conv of 1280 channels, global average pooling, dropout and a linear classifier.
Every conv is bias-free and followed by batch norm (decay 0.99, eps 1e-3); the
activation is swish (SiLU). An MBConv block: 1x1 expansion (absent at expand ratio 1),
kxk depthwise conv (carries the stride), squeeze-excite on the expanded channels with
max(1, int(in_ch * 0.25)) hidden units (swish, then a sigmoid gate), 1x1 projection
without activation, and, when the block keeps stride 1 and its channels, drop-connect
and the identity skip.

Compound scaling (1905.11946 section 3.3): channels `round_filters(c * width_mult)`
and stage repeats `ceil(r * depth_mult)`; each variant's resolution (train = test)
and dropout are its own. A `width` argument (default 1.0) multiplies the
variant's width coefficient, for small experiments. Module names (Haiku's, for the classes below):

  EfficientNet/~/stem_conv, stem_bn
  EfficientNet/~/mb_conv_block_{k}/~/expand_conv, expand_bn    (expand ratio > 1 only)
  EfficientNet/~/mb_conv_block_{k}/~/depthwise_conv, depthwise_bn
  EfficientNet/~/mb_conv_block_{k}/~/se_reduce, se_expand      (1x1 convs with bias)
  EfficientNet/~/mb_conv_block_{k}/~/project_conv, project_bn
  EfficientNet/~/head_conv, head_bn
  EfficientNet/~/linear                                        classifier (w, b)

Parameters at 1000 classes (BN scale and offset counted; the moving statistics are Haiku
state): B0 5,288,548 ... B7 66,347,960, the Keras/TF reference's trainable counts.
Build with `hk.transform_with_state`.
"""

import dataclasses
import math
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax.models import family, layers
from nfnet_jax.models.batchnorm import BatchNorm

# EfficientNet-B0's stages (1905.11946 table 1, as efficientnet_builder.py's block strings):
# (repeats, kernel, stride, expand ratio, output channels).
B0_STAGES = (
  (1, 3, 1, 1, 16),
  (2, 3, 2, 6, 24),
  (2, 5, 2, 6, 40),
  (3, 3, 2, 6, 80),
  (3, 5, 1, 6, 112),
  (4, 5, 2, 6, 192),
  (1, 3, 1, 6, 320),
)
STEM_CH, HEAD_CH, SE_RATIO = 32, 1280, 0.25
BN_DECAY, BN_EPS = 0.99, 1e-3
# variant: (width multiplier, depth multiplier, resolution, dropout), efficientnet_builder.py.
_COEFFICIENTS = {
  'B0': (1.0, 1.0, 224, 0.2),
  'B1': (1.0, 1.1, 240, 0.2),
  'B2': (1.1, 1.2, 260, 0.3),
  'B3': (1.2, 1.4, 300, 0.3),
  'B4': (1.4, 1.8, 380, 0.4),
  'B5': (1.6, 2.2, 456, 0.4),
  'B6': (1.8, 2.6, 528, 0.5),
  'B7': (2.0, 3.1, 600, 0.5),
}


def round_filters(channels: int, width_mult: float, divisor: int = 8) -> int:
  """channels * width_mult to the nearest multiple of `divisor`, never below 90% of it."""
  scaled = channels * width_mult
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * scaled else rounded


def round_repeats(repeats: int, depth_mult: float) -> int:
  return int(math.ceil(depth_mult * repeats))


# The variant table: compound coefficients, and the stage depths and widths they give.
EFFICIENTNET_VARIANTS = {
  name: dict(
    width_mult=w,
    depth_mult=d,
    depth=[round_repeats(stage[0], d) for stage in B0_STAGES],
    width=[round_filters(stage[-1], w) for stage in B0_STAGES],
    train_imsize=size,
    test_imsize=size,
    drop_rate=drop,
  )
  for name, (w, d, size, drop) in _COEFFICIENTS.items()
}


@dataclasses.dataclass(frozen=True)
class MBConvSpec:
  in_ch: int
  out_ch: int
  expand_ch: int  # == in_ch when the expand ratio is 1 (no expansion conv)
  kernel: int
  stride: int
  se_ch: int
  drop_connect_rate: float

  @property
  def has_skip(self) -> bool:
    return self.stride == 1 and self.in_ch == self.out_ch


def block_specs(variant: str = 'B0', drop_connect_rate: float = 0.2, width: float = 1.0):
  """Returns (stem channels, one MBConvSpec per block, head channels).

  `width` multiplies the variant's width coefficient (1.0: the published network), for
  small experiments; channels are rounded as the compound scaling rounds them.
  """
  row = family.lookup_variant(EFFICIENTNET_VARIANTS, 'EfficientNet', variant)
  if width <= 0:
    raise ValueError(f'EfficientNet width must be > 0, got {width}; 1.0 is the published one.')
  width_mult = row['width_mult'] * width
  widths = row['width'] if width == 1.0 else [round_filters(st[-1], width_mult) for st in B0_STAGES]
  stem_ch = round_filters(STEM_CH, width_mult)
  stages = [(r, k, s, e, c) for (_, k, s, e, _), r, c in zip(B0_STAGES, row['depth'], widths)]
  num_blocks, specs, in_ch = sum(row['depth']), [], stem_ch
  for repeats, kernel, stride, expand, out_ch in stages:
    for i in range(repeats):
      specs.append(
        MBConvSpec(
          in_ch=in_ch,
          out_ch=out_ch,
          expand_ch=in_ch * expand,
          kernel=kernel,
          stride=stride if i == 0 else 1,
          se_ch=max(1, int(in_ch * SE_RATIO)),  # from the block's input channels
          # Grows linearly with the block's 0-based index over the whole network.
          drop_connect_rate=drop_connect_rate * len(specs) / num_blocks,
        )
      )
      in_ch = out_ch
  return stem_ch, specs, round_filters(HEAD_CH, width_mult)


def conv_init(kernel: int, out_ch: int) -> hk.initializers.Initializer:
  """N(0, 2 / fan_out), fan_out = k * k * output channels (per group: 1 for depthwise)."""
  return hk.initializers.RandomNormal(math.sqrt(2.0 / (kernel * kernel * out_ch)))


def conv(out_ch: int, kernel: int = 1, stride: int = 1, name: Optional[str] = None) -> hk.Conv2D:
  return hk.Conv2D(
    out_ch, kernel, stride, with_bias=False, w_init=conv_init(kernel, out_ch), name=name
  )


def drop_connect(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  """Drops the block's branch per example and, unlike the NF families' stochastic depth,
  rescales the kept ones by 1 / keep_prob (the TF reference's `drop_connect`)."""
  if not is_training or not rate:
    return x
  return layers.stochastic_depth(x, rate, is_training) / (1.0 - rate)


class MBConvBlock(hk.Module):
  """Mobile inverted bottleneck with squeeze-excite (Sandler et al. 2018; Hu et al. 2018)."""

  def __init__(
    self,
    spec: MBConvSpec,
    bn_sync: str = 'none',
    bn_decay: float = BN_DECAY,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.spec = spec

    def bn(name):
      return BatchNorm(bn_decay, BN_EPS, bn_sync, name=name)

    if spec.expand_ch != spec.in_ch:
      self.expand_conv, self.expand_bn = conv(spec.expand_ch, name='expand_conv'), bn('expand_bn')
    self.depthwise_conv = hk.DepthwiseConv2D(
      1,
      spec.kernel,
      spec.stride,
      with_bias=False,
      w_init=conv_init(spec.kernel, 1),
      name='depthwise_conv',
    )
    self.depthwise_bn = bn('depthwise_bn')
    self.se_reduce = hk.Conv2D(spec.se_ch, 1, w_init=conv_init(1, spec.se_ch), name='se_reduce')
    self.se_expand = hk.Conv2D(
      spec.expand_ch, 1, w_init=conv_init(1, spec.expand_ch), name='se_expand'
    )
    self.project_conv, self.project_bn = conv(spec.out_ch, name='project_conv'), bn('project_bn')

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = x
    if self.spec.expand_ch != self.spec.in_ch:
      out = jax.nn.silu(self.expand_bn(self.expand_conv(out), is_training))
    out = jax.nn.silu(self.depthwise_bn(self.depthwise_conv(out), is_training))
    gate = jnp.mean(out, axis=(1, 2), keepdims=True)  # squeeze: [B, 1, 1, C]
    gate = self.se_expand(jax.nn.silu(self.se_reduce(gate)))
    out = jax.nn.sigmoid(gate) * out
    branch = self.project_bn(self.project_conv(out), is_training)  # no activation
    if not self.spec.has_skip:
      return branch, branch
    return drop_connect(branch, self.spec.drop_connect_rate, is_training) + x, branch


class EfficientNet(hk.Module):
  """EfficientNet-B0..B7.

  Call as `model(x, is_training)` with NHWC float images inside `hk.transform_with_state`;
  returns a dict with `logits` [B, num_classes] and `pool` [B, C]; with
  `return_metrics=True` also `block_{i}` signal statistics, as the NF families.
  `bn_sync`: how batch statistics are shared across devices (`batchnorm.BatchNorm`);
  `drop_rate` None: the variant's dropout before the classifier. `width` multiplies the
  variant's width coefficient (`block_specs`; 1.0 is the published network).
  `bn_decay`: the moving statistics' decay (the reference's 0.99; a short run needs a
  faster one, or its moving statistics lag the weights).
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'B0',
    bn_sync: str = 'none',
    drop_rate: Optional[float] = None,
    drop_connect_rate: float = 0.2,
    width: float = 1.0,
    bn_decay: float = BN_DECAY,
    name: str = 'EfficientNet',
    *,
    remat: bool = False,
  ):
    super().__init__(name=name)
    self.num_classes, self.variant, self.remat = num_classes, variant, remat
    row = family.lookup_variant(EFFICIENTNET_VARIANTS, 'EfficientNet', variant)
    self.drop_rate = row['drop_rate'] if drop_rate is None else drop_rate
    stem_ch, self.specs, head_ch = block_specs(variant, drop_connect_rate, width)
    self.stem_conv = conv(stem_ch, 3, stride=2, name='stem_conv')
    self.stem_bn = BatchNorm(bn_decay, BN_EPS, bn_sync, name='stem_bn')
    self.blocks = [MBConvBlock(spec, bn_sync, bn_decay) for spec in self.specs]
    self.head_conv = conv(head_ch, name='head_conv')
    self.head_bn = BatchNorm(bn_decay, BN_EPS, bn_sync, name='head_bn')
    # U(-1/sqrt(num_classes), 1/sqrt(num_classes)), the TF reference's dense init.
    limit = 1.0 / math.sqrt(num_classes)
    self.fc = hk.Linear(num_classes, w_init=hk.initializers.RandomUniform(-limit, limit))

  def __call__(
    self, x: jax.Array, is_training: bool, return_metrics: bool = False
  ) -> dict[str, Any]:
    layers.check_image_batch(x, 'EfficientNet')
    outputs = {}
    out = jax.nn.silu(self.stem_bn(self.stem_conv(x), is_training))
    out = layers.apply_blocks(
      self.blocks, out, is_training, outputs if return_metrics else None, remat=self.remat
    )
    out = jax.nn.silu(self.head_bn(self.head_conv(out), is_training))
    return layers.classifier_head(out, self.fc, self.drop_rate, is_training, outputs)


def count_flops(
  variant: str = 'B0',
  image_size: Optional[int] = None,
  num_classes: int = 1000,
  width: float = 1.0,
  **unused_kwargs,
) -> family.Cost:
  """Parameters and multiply-accumulates of one image's forward pass at `image_size`
  (default: the variant's resolution), from the same MBConvSpecs that build the model.

  A bias-free conv followed by batch norm has the weights plus 2 * out_ch parameters
  (scale, offset): `family.conv_cost`'s count. Elementwise work is not counted.
  """
  stem_ch, specs, head_ch = block_specs(variant, width=width)
  size = image_size or EFFICIENTNET_VARIANTS[variant]['test_imsize']
  total, size = family.conv_cost(size, 3, stem_ch, 3, 2)
  for s in specs:
    if s.expand_ch != s.in_ch:
      total += family.conv_cost(size, s.in_ch, s.expand_ch, 1)[0]
    cost, size = family.conv_cost(size, s.expand_ch, s.expand_ch, s.kernel, s.stride, s.expand_ch)
    total += cost + family.squeeze_excite_cost(s.expand_ch, s.se_ch)
    total += family.conv_cost(size, s.expand_ch, s.out_ch, 1)[0]
  return total + family.head_cost(size, specs[-1].out_ch, num_classes, head_ch)


FAMILY = family.Family(
  name='EfficientNet',
  title='EfficientNet',
  model=EfficientNet,
  variants=EFFICIENTNET_VARIANTS,
  prefixes=('EfficientNet-',),
  # The TF reference's arguments; drop_rate None = the variant's.
  defaults=dict(bn_sync='none', drop_rate=None, drop_connect_rate=0.2, width=1.0),
  root='EfficientNet',
  block='mb_conv_block',
  # The TF reference's eval (preprocessing.py, `_decode_and_center_crop`): centre square
  # of side int(min(H, W) * S / (S + 32)) at offset (H - side + 1) // 2, bicubic resize to
  # S x S. Later versions of that file pad by round(S / 7) instead of 32 (the same at 224).
  eval_view='crop_resize',
  count_flops=count_flops,
  stateful=True,
)
