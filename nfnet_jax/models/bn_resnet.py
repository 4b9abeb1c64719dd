"""BN-ResNet-50..600: the batch-normalised ResNet baseline of the NF papers (arXiv 2101.08692,
section 2 and figure 1; arXiv 2102.06171, table 3's ResNet-50).

The pre-activation ResNet-V2 (He et al. 2016, arXiv 1603.05027) of DeepMind's released
`resnet.py` (deepmind-research/nfnets): a bias-free 7x7 stride-2 stem conv and a 3x3 max-pool,
bottleneck blocks BN-ReLU-conv (1x1, strided 3x3, 1x1 to 4x the bottleneck) whose stage's first
block projects the pre-activated input with a strided 1x1 conv, then a final BN-ReLU, global
average pooling and a zero-initialised classifier. `preactivation=False` gives the released
code's post-activation (V1) block instead: conv-BN(-ReLU) with a BN on the projection and a
BN-ReLU stem. Module and parameter names are the released code's (Haiku's defaults for its
classes):

  ResNet/~/initial_conv                       7x7 stride-2 conv (w)
  ResNet/~/res_block_v2_{k}/~/bn0, conv0      BN of the block input, 1x1 conv
  ResNet/~/res_block_v2_{k}/~/bn1, conv1      3x3 conv, carries the stride
  ResNet/~/res_block_v2_{k}/~/bn2, conv2      1x1 conv to the block's output channels
  ResNet/~/res_block_v2_{k}/~/conv_shortcut   a stage's first block only
  ResNet/~/final_bn                           before the pool
  ResNet/~/linear                             classifier (w, b)

Batch norm is `batchnorm.BatchNorm` (scale and offset are parameters, the moving mean and
variance Haiku state), with the released experiment's decay 0.9 and Haiku's eps 1e-5: build
the model with `hk.transform_with_state` (`registry.build_model_with_state`).

Parameter count at 1000 classes, width 4: BN-ResNet-50 (V2) has 25,549,352 parameters; with
`preactivation=False` (V1) 25,557,032, the familiar ResNet-50 count. The convolutions and the
classifier are the same; the batch norms differ: V1 normalises each conv's output (a stem BN of
64 channels, a BN after every conv including the 4 projections), V2 each conv's input (every
block's input, the bottleneck twice, and a final BN of 2048 channels) with no BN on the
projections, 3,840 channels fewer.
"""

from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax.models import family, layers
from nfnet_jax.models.batchnorm import BatchNorm
from nfnet_jax.models.nf_resnet import NF_RESNET_VARIANTS

# The ResNet depths of DeepMind's resnet.py and nf_resnet.py are one table (blocks per stage,
# stage widths 64/128/256/512 x the width multiplier, 224 px): BN-ResNet '50' is NF-ResNet
# 'ResNet50' with batch norm.
BN_RESNET_VARIANTS = {
  name.removeprefix('ResNet'): dict(row) for name, row in NF_RESNET_VARIANTS.items()
}
_STRIDES = [1, 2, 2, 2]  # the stem's max-pool already halved the input


def stage_plan(variant: str = '50', width: float = 4) -> tuple[int, list[tuple[int, int, int]]]:
  """(stem channels, one (in_ch, out_ch, stride) per block); bottlenecks are out_ch // 4."""
  params = family.lookup_variant(BN_RESNET_VARIANTS, 'BN-ResNet', variant)
  stem_ch = int(16 * width)
  blocks, in_ch = [], stem_ch
  for depth, stage_width, stride in zip(params['depth'], params['width'], _STRIDES, strict=True):
    out_ch = int(stage_width * width)
    for i in range(depth):
      blocks.append((in_ch, out_ch, stride if i == 0 else 1))
      in_ch = out_ch
  return stem_ch, blocks


def _conv(channels: int, kernel: int, stride: int = 1, name: Optional[str] = None) -> hk.Conv2D:
  # The released convs: no bias (a BN's offset follows or precedes), Haiku's default init.
  return hk.Conv2D(channels, kernel, stride=stride, with_bias=False, padding='SAME', name=name)


class ResBlockV2(hk.Module):
  """Pre-activation bottleneck: BN-ReLU-conv 1x1, BN-ReLU-conv 3x3 (strided), BN-ReLU-conv 1x1.

  Returns (output, residual branch) like the NF blocks, for `layers.apply_blocks`.
  """

  def __init__(
    self,
    out_ch: int,
    stride: int,
    use_projection: bool,
    norm: Callable[..., BatchNorm],
    activation: Callable,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    mid = out_ch // 4
    self.activation = activation
    self.bn0, self.conv0 = norm(name='bn0'), _conv(mid, 1, name='conv0')
    self.bn1, self.conv1 = norm(name='bn1'), _conv(mid, 3, stride, name='conv1')
    self.bn2, self.conv2 = norm(name='bn2'), _conv(out_ch, 1, name='conv2')
    self.conv_shortcut = _conv(out_ch, 1, stride, name='conv_shortcut') if use_projection else None

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    act = self.activation
    out = act(self.bn0(x, is_training))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.conv0(out)
    out = self.conv1(act(self.bn1(out, is_training)))
    out = self.conv2(act(self.bn2(out, is_training)))
    return out + shortcut, out


class ResBlockV1(hk.Module):
  """Post-activation bottleneck: conv-BN-ReLU twice, conv-BN, then ReLU(branch + shortcut)."""

  def __init__(
    self,
    out_ch: int,
    stride: int,
    use_projection: bool,
    norm: Callable[..., BatchNorm],
    activation: Callable,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    mid = out_ch // 4
    self.activation, self.norm = activation, norm
    self.bn0, self.conv0 = norm(name='bn0'), _conv(mid, 1, name='conv0')
    self.bn1, self.conv1 = norm(name='bn1'), _conv(mid, 3, stride, name='conv1')
    self.bn2, self.conv2 = norm(name='bn2'), _conv(out_ch, 1, name='conv2')
    self.conv_shortcut = _conv(out_ch, 1, stride, name='conv_shortcut') if use_projection else None

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    act = self.activation
    shortcut = x
    if self.conv_shortcut is not None:  # built here as released: `res_block_v1/shortcut_bn`
      shortcut = self.norm(name='shortcut_bn')(self.conv_shortcut(x), is_training)
    out = act(self.bn0(self.conv0(x), is_training))
    out = act(self.bn1(self.conv1(out), is_training))
    out = self.bn2(self.conv2(out), is_training)
    return act(out + shortcut), out


class BNResNet(hk.Module):
  """Batch-normalised ResNet (V2 by default), as DeepMind's released `ResNet`.

  Call as `model(x, is_training)` with NHWC float images inside `hk.transform_with_state`;
  returns `logits` and `pool` and, with `return_metrics=True`, `block_{i}` (`avg_sq_mean`,
  `avg_var` of the block output, `res_avg_var` of the residual branch) as the NF families
  do. Training normalises with batch statistics (across devices per `bn_sync`, see
  `batchnorm.BatchNorm`) and updates the moving averages; evaluation uses them.
  `remat=True` runs each block under `hk.remat`.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = '50',
    width: float = 4,
    bn_sync: str = 'none',
    bn_decay: float = 0.9,
    bn_eps: float = 1e-5,
    axis_name: str = 'batch',
    activation: str = 'relu',
    drop_rate: float = 0.0,
    fc_init: hk.initializers.Initializer = jnp.zeros,
    preactivation: bool = True,
    name: str = 'ResNet',
    *,
    remat: bool = False,
  ):
    super().__init__(name=name)
    self.num_classes = num_classes
    self.variant = variant
    self.drop_rate = drop_rate
    self.preactivation = preactivation
    self.remat = remat
    # Plain activations: batch norm, not a gamma, keeps the signal's scale.
    self.activation = layers.activation_fn(activation)

    def norm(name):
      return BatchNorm(bn_decay, bn_eps, bn_sync=bn_sync, axis_name=axis_name, name=name)

    stem_ch, self.plan = stage_plan(variant, width)
    self.initial_conv = _conv(stem_ch, 7, 2, name='initial_conv')
    self.initial_bn = None if preactivation else norm('initial_bn')
    block = ResBlockV2 if preactivation else ResBlockV1
    self.blocks = [
      block(out_ch, stride, in_ch != out_ch or stride > 1, norm, self.activation)
      for in_ch, out_ch, stride in self.plan
    ]
    self.final_bn = norm('final_bn') if preactivation else None
    self.fc = hk.Linear(num_classes, with_bias=True, w_init=fc_init)

  def __call__(
    self, x: jax.Array, is_training: bool, return_metrics: bool = False
  ) -> dict[str, Any]:
    layers.check_image_batch(x, 'ResNet')
    outputs = {}
    out = self.initial_conv(x)
    if self.initial_bn is not None:
      out = self.activation(self.initial_bn(out, is_training))
    out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    out = layers.apply_blocks(
      self.blocks, out, is_training, outputs if return_metrics else None, remat=self.remat
    )
    if self.final_bn is not None:
      out = self.activation(self.final_bn(out, is_training))
    return layers.classifier_head(out, self.fc, self.drop_rate, is_training, outputs)


def count_flops(
  variant: str = '50',
  image_size: Optional[int] = None,
  num_classes: int = 1000,
  width: float = 4,
  preactivation: bool = True,
  **unused_kwargs,
) -> family.Cost:
  """Parameters (BN scale and offset included; the moving statistics are state, not counted)
  and multiply-accumulates of one image's forward pass, from the plan that builds the model."""

  def conv(size, in_ch, out_ch, kernel, stride=1):
    side = family.out_size(size, stride)
    weights = kernel * kernel * in_ch * out_ch
    return family.Cost(weights, side * side * weights), side

  def bn(channels):
    return family.Cost(2 * channels, 0)

  stem_ch, plan = stage_plan(variant, width)
  size = image_size or BN_RESNET_VARIANTS[variant]['test_imsize']
  total, size = conv(size, 3, stem_ch, 7, 2)
  if not preactivation:
    total += bn(stem_ch)
  size = family.out_size(size, 2)  # max-pool
  for in_ch, out_ch, stride in plan:
    mid = out_ch // 4
    cost, side = conv(size, mid, mid, 3, stride)
    total += conv(size, in_ch, mid, 1)[0] + cost + conv(side, mid, out_ch, 1)[0]
    projection = in_ch != out_ch or stride > 1
    if projection:
      total += conv(size, in_ch, out_ch, 1, stride)[0]
    # V2 normalises each conv's input, V1 each conv's output (the projection's too).
    if preactivation:
      total += bn(in_ch) + bn(mid) + bn(mid)
    else:
      total += bn(mid) + bn(mid) + bn(out_ch) + (bn(out_ch) if projection else family.Cost(0, 0))
    size = side
  last = plan[-1][1]
  if preactivation:
    total += bn(last)  # final_bn
  return total + family.linear_cost(last, num_classes)


FAMILY = family.Family(
  name='BNResNet',
  title='BN-ResNet',
  model=BNResNet,
  variants=BN_RESNET_VARIANTS,
  prefixes=('BN-ResNet',),
  # DeepMind's released ResNet experiment: width 4, BatchNorm decay 0.9, no dropout.
  defaults=dict(
    width=4.0,
    bn_decay=0.9,
    bn_eps=1e-5,
    activation='relu',
    drop_rate=0.0,
    preactivation=True,
  ),
  root='ResNet',
  block='res_block_v2',
  eval_view='crop_resize',
  count_flops=count_flops,
  stateful=True,
)
