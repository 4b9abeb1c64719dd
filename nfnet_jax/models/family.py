"""What a model family tells the rest of the package: one `Family` record per family.

Each family file (`nfnet.py`, `nf_resnet.py`, `nf_regnet.py`) ends with its `FAMILY`; the
registry (`registry.py`) collects them, and every other module (configs, weights, the
classifier, the benchmark) reads a family's facts from that record and nowhere else.

Model names. A family's variants are keyed in its table by the name its Haiku class takes
(`NFNet(variant='F0')`, `NFRegNet(variant='B0')`). Tools, configs and weights files name a
model by `prefix + key` for any of the family's `prefixes`; the first prefix gives the
canonical name. NFNets are `F0`..`F7+` (or `NFNet-F0`), NF-ResNets `NF-ResNet50` (or
`ResNet50`), NF-RegNets `NF-RegNet-B0` (or `B0`). Families added later take a prefix only
(`EfficientNet-B0`, `BN-ResNet50`), so every name stays unique; the registry checks this.

The batch-normalised baselines (`bn_resnet.py`, ...) are `Family` records too, with
`stateful=True`; the registry keeps them apart from the NF families (`BASELINES`).
"""

import dataclasses
import math
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Cost:
  """Parameters and multiply-accumulates of one image's forward pass (paper table 3)."""

  params: int
  macs: int

  def __add__(self, other: 'Cost') -> 'Cost':
    return Cost(self.params + other.params, self.macs + other.macs)


def out_size(size: int, stride: int) -> int:
  return math.ceil(size / stride)  # SAME padding


def conv_cost(
  size: int, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> tuple[Cost, int]:
  """A WSConv2D (weight + gain + bias) at input side `size`; MACs at the output side.

  Returns the cost and the output side. Elementwise work (activations, pooling, gates)
  is not counted, as in the paper.
  """
  side = out_size(size, stride)
  weights = kernel * kernel * (in_ch // groups) * out_ch
  return Cost(params=weights + 2 * out_ch, macs=side * side * weights), side


def linear_cost(in_ch: int, out_ch: int) -> Cost:
  return Cost(params=in_ch * out_ch + out_ch, macs=in_ch * out_ch)


def squeeze_excite_cost(channels: int, hidden: int) -> Cost:
  return linear_cost(channels, hidden) + linear_cost(hidden, channels)


SKIP_GAIN = Cost(params=1, macs=0)


def head_cost(size: int, in_ch: int, num_classes: int, final_ch: int = 0) -> Cost:
  """The 1x1 `final_conv` to `final_ch` channels (0: none) and the classifier."""
  total = Cost(0, 0)
  if final_ch:
    total, in_ch = conv_cost(size, in_ch, final_ch, 1)[0], final_ch
  return total + linear_cost(in_ch, num_classes)


def bottleneck_cost(
  spec, size: int, *, second_3x3: bool = False, se_hidden: int = 0, se_on_bottleneck: bool = False
) -> tuple[Cost, int]:
  """One residual block of the NF families (a `layers.BlockSpec`) at input side `size`.

  conv0 (1x1 to the bottleneck), conv1 (3x3, grouped, strided), conv1b (a second 3x3,
  NFNets), conv2 (1x1 to the output), a squeeze-excite of `se_hidden` units (0: none) on
  the output channels or on the bottleneck, the 1x1 `conv_shortcut` of a block that
  changes stride or width (strided or after pooling: the same cost), and `skip_gain`.
  Returns the cost and the output side.
  """
  mid, groups = spec.bottleneck_ch, spec.groups
  total = conv_cost(size, spec.in_ch, mid, 1)[0]
  cost, side = conv_cost(size, mid, mid, 3, spec.stride, groups)
  total += cost
  if second_3x3:
    total += conv_cost(side, mid, mid, 3, 1, groups)[0]
  total += conv_cost(side, mid, spec.out_ch, 1)[0]
  if se_hidden:
    total += squeeze_excite_cost(mid if se_on_bottleneck else spec.out_ch, se_hidden)
  if spec.stride > 1 or spec.in_ch != spec.out_ch:
    total += conv_cost(side, spec.in_ch, spec.out_ch, 1)[0]
  return total + SKIP_GAIN, side


def lookup_variant(
  table: Mapping[str, Mapping[str, Any]], title: str, variant: str
) -> Mapping[str, Any]:
  """`table[variant]`, or an error that lists the family's variants."""
  if variant not in table:
    raise ValueError(f'Unknown {title} variant {variant!r}; valid variants: {", ".join(table)}.')
  return table[variant]


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything the package needs to know about one model family.

  Attributes:
    name: the Haiku class's name and `config.model.name` ('NFNet', 'NFResNet', ...).
    title: the family's name in prose and messages ('NFNet', 'NF-ResNet', ...).
    model: the Haiku module, built as `model(num_classes, variant=key, **kwargs)`.
    variants: the variant table, keyed by the class's `variant` argument; every row has
      at least `depth`, `width`, `train_imsize` and `test_imsize`.
    prefixes: model names are `prefix + key`; the first prefix makes the canonical name.
    defaults: the model arguments configs start from (DeepMind's released ones); the
      `width` here is the one a weights file is assumed to have been made with.
    root: the top-level Haiku module name of the parameter tree.
    block: the residual blocks' module name (`<root>/~/<block>`, `<block>_1`, ...).
    eval_view: the evaluation preprocessing the family's accuracies are measured with.
    count_flops: `(variant, image_size=None, num_classes=1000, **model_kwargs) -> Cost`.
    classifier: the classifier's module name under the root.
    stateful: whether the model keeps Haiku state (batch norm's moving statistics): build
      it with `registry.build_model_with_state` (`hk.transform_with_state`).
  """

  name: str
  title: str
  model: type
  variants: Mapping[str, Mapping[str, Any]]
  prefixes: tuple[str, ...]
  defaults: Mapping[str, Any]
  root: str
  block: str
  eval_view: str
  count_flops: Callable[..., Cost]
  classifier: str = 'linear'
  stateful: bool = False

  def canonical_name(self, key: str) -> str:
    return self.prefixes[0] + key

  def names(self) -> dict[str, str]:
    """Every accepted model name -> the variant table's key."""
    return {prefix + key: key for prefix in self.prefixes for key in self.variants}

  def classifier_module(self, root: str | None = None) -> str:
    return f'{root or self.root}/~/{self.classifier}'
