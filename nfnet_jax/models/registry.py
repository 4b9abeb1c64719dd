"""The model families, by name, and building a model from a config.

Adding a family: write its file (variant table, blocks, network, cost counter, `FAMILY`)
and add `FAMILY` to `FAMILIES` below. Everything else reads the record.

`FAMILIES` are the normalizer-free families: what the trainer, the weights tools and the
parametrised tests iterate. `BASELINES` are the batch-normalised models the papers compare
against (`stateful` records: Haiku state, built with `build_model_with_state`); model names,
`resolve`, `canonical_name`, `variant_params` and `count_flops` cover both.
"""

from typing import Any, Mapping, Optional

import haiku as hk
import jax
import jmp
import ml_collections

from nfnet_jax.models import bn_resnet, efficientnet, nf_regnet, nf_resnet, nfnet
from nfnet_jax.models.family import Cost, Family

FAMILIES: dict[str, Family] = {
  f.name: f
  for f in (
    nfnet.FAMILY,
    nf_resnet.FAMILY,
    nf_regnet.FAMILY,
  )
}
BASELINES: dict[str, Family] = {f.name: f for f in (bn_resnet.FAMILY, efficientnet.FAMILY)}


def _all_families() -> list[Family]:
  return [*FAMILIES.values(), *BASELINES.values()]


def _model_names() -> dict[str, tuple[Family, str]]:
  names: dict[str, tuple[Family, str]] = {}
  for fam in _all_families():
    for name, key in fam.names().items():
      if name in names:
        raise ValueError(
          f'Model name {name!r} is both {names[name][0].title} and '
          f'{fam.title}: give one family another prefix.'
        )
      names[name] = (fam, key)
  return names


_NAMES = _model_names()
DTYPES = ('float32', 'bfloat16')


def get_family(name: str) -> Family:
  """The family record for `config.model.name` ('NFNet', 'NFResNet', 'BNResNet', ...)."""
  families = {fam.name: fam for fam in _all_families()}
  if name not in families:
    raise ValueError(f'Unknown model family {name!r}; valid: {", ".join(families)}.')
  return families[name]


def resolve(model_name: str) -> tuple[Family, str]:
  """(family, variant-table key) of any model name: 'F0', 'NF-RegNet-B0', 'B0', ..."""
  if model_name not in _NAMES:
    listed = '; '.join(
      f'{fam.title}: {", ".join(fam.canonical_name(k) for k in fam.variants)}'
      for fam in _all_families()
    )
    raise ValueError(
      f'Unknown variant {model_name!r}; valid variants are {listed} '
      '(NF-ResNet and NF-RegNet variants also by their short names, '
      'e.g. ResNet50, B0).'
    )
  return _NAMES[model_name]


def family_of_variant(variant: str) -> str:
  """'NFNet', 'NFResNet', 'NFRegNet', 'BNResNet', ...: the family `variant` names."""
  return resolve(variant)[0].name


def variant_params(variant: str) -> Mapping[str, Any]:
  """The variant's row of its family's table (depths, widths, train/test sizes, ...)."""
  fam, key = resolve(variant)
  return fam.variants[key]


def canonical_name(variant: str) -> str:
  """'NF-RegNet-B0' for 'B0', 'F0' for 'NFNet-F0', ...: the name tools print and store."""
  fam, key = resolve(variant)
  return fam.canonical_name(key)


def family_of_root(root: str) -> Optional[Family]:
  """The family whose parameter trees live under the Haiku module `root`, or None."""
  # The NF families only: the weights tools that ask build stateless models.
  return next((fam for fam in FAMILIES.values() if fam.root == root), None)


def model_variant(model_config: ml_collections.ConfigDict) -> tuple[Family, str, dict]:
  """(family, variant key, the other model arguments) of a config's `model` section;
  an error when `model.name` and `model.kwargs.variant` name different families.
  The variant is any model name, or a key of `model.name`'s table ('50' for 'BNResNet',
  whose names all carry the prefix: `config.model_config` writes the key)."""
  kwargs = dict(model_config.kwargs)
  named = get_family(model_config.name)
  variant = kwargs.pop('variant')
  if variant in named.variants:
    return named, variant, kwargs
  fam, key = resolve(variant)
  if fam is not named:
    raise ValueError(
      f'model.kwargs.variant={key!r} is an {fam.name} variant but '
      f'model.name is {named.name!r}: set one to match the other.'
    )
  return fam, key, kwargs


def count_flops(
  variant: str = 'F0', image_size: Optional[int] = None, num_classes: int = 1000, **model_kwargs
) -> Cost:
  """Parameters and multiply-accumulates of one image's forward pass of any family's
  variant (paper table 3), analytically: `count_flops('F7', 608)` is instant.

  `image_size` defaults to the variant's test size; `model_kwargs` are the model's
  shape arguments (width, group_size, ...), defaulting to the family's.
  """
  fam, key = resolve(variant)
  return fam.count_flops(key, image_size, num_classes, **model_kwargs)


def mixed_precision_policy(dtype: str) -> jmp.Policy:
  """float32 master params; compute in `dtype`; float32 outputs (logits for the loss)."""
  if dtype not in DTYPES:
    raise ValueError(f'Unknown dtype {dtype!r}; valid: {", ".join(DTYPES)}.')
  return jmp.get_policy(f'params=float32,compute={dtype},output=float32')


def _forward(model_config: ml_collections.ConfigDict, num_classes: int, dtype: str):
  fam, key, kwargs = model_variant(model_config)
  # remat changes how the backward pass is computed, not the weights: it sits beside
  # `kwargs`, so it stays out of `model_signature` (a checkpoint or released weights
  # load whether or not it is on).
  remat = bool(model_config.get('remat', False))
  model_cls, kwargs = fam.model, dict(variant=key, remat=remat, **kwargs)
  if fam.stateful:  # bn_sync, like remat, sits beside `kwargs` (config.model_config)
    kwargs['bn_sync'] = model_config.get('bn_sync', kwargs.get('bn_sync', 'none'))
  policy = mixed_precision_policy(dtype)

  def forward(images, is_training: bool, return_metrics: bool = False):
    with hk.mixed_precision.push_policy(model_cls, policy):
      model = model_cls(num_classes, **kwargs)
      return model(images, is_training, return_metrics=return_metrics)

  return fam, forward


def build_model(
  model_config: ml_collections.ConfigDict, num_classes: int, dtype: str = 'float32'
) -> hk.Transformed:
  """A pure (init, apply) pair: apply(params, rng, images, is_training, ...) -> dict.

  `model_config.remat` (default False) runs every residual block under `hk.remat`.
  With dtype='bfloat16', haiku casts the float32 parameters and the inputs to
  bfloat16 inside the model and its output back to float32 (the paper's
  mixed-precision recipe, section 3); gradients then flow back to float32 parameters.
  A family with state (batch norm) is refused: use `build_model_with_state`.
  """
  # model_variant resolves any of the variant's names (and refuses another family's).
  fam, forward = _forward(model_config, num_classes, dtype)
  if fam.stateful:
    raise ValueError(
      f'{fam.title} keeps batch-norm statistics as Haiku state: build it with '
      'models.build_model_with_state (hk.transform_with_state), not build_model.'
    )
  return hk.transform(forward)


def build_model_with_state(
  model_config: ml_collections.ConfigDict, num_classes: int, dtype: str = 'float32'
) -> hk.TransformedWithState:
  """`build_model` for any family, stateful or not, as `hk.transform_with_state`:
  init(rng, images, is_training) -> (params, state); apply(params, state, rng, images,
  is_training, ...) -> (outputs, new state). The NF families' state is empty; batch norm's
  moving statistics change only when `is_training`. Batch norm computes its statistics in
  float32 whatever `dtype`.
  """
  return hk.transform_with_state(_forward(model_config, num_classes, dtype)[1])


def model_signature(model_config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What identifies a parameter tree: a checkpoint of another signature won't fit.
  The variant is its table key, whichever of its names the config uses."""
  fam, key, kwargs = model_variant(model_config)
  return {'family': fam.name, 'num_classes': int(num_classes), 'variant': key, **kwargs}


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
