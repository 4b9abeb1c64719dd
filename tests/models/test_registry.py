"""Tests for nfnet_jax.models.registry: model names, families, configs and counts."""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnet_jax import config as config_lib
from nfnet_jax import models
from nfnet_jax.models import FAMILIES, registry
from tests import helpers

# (model name, family, variant-table key) for every name every family accepts.
ALL_NAMES = [(name, fam, key) for fam in FAMILIES.values() for name, key in fam.names().items()]


def model_config(name, **kwargs):
  return ml_collections.ConfigDict(dict(name=name, kwargs=kwargs))


def test_package_exports():
  for name in models.__all__:
    assert hasattr(models, name), name
  assert models.FAMILIES is registry.FAMILIES


def test_every_model_name_resolves():
  assert len(ALL_NAMES) == sum(len(f.prefixes) * len(f.variants) for f in FAMILIES.values())
  for name, fam, key in ALL_NAMES:
    assert registry.resolve(name) == (fam, key), name
    assert registry.family_of_variant(name) == fam.name
    assert registry.variant_params(name) is fam.variants[key]


def test_canonical_name_round_trips():
  for name, fam, key in ALL_NAMES:
    canonical = registry.canonical_name(name)
    assert canonical == fam.canonical_name(key)
    assert registry.canonical_name(canonical) == canonical
    assert registry.resolve(canonical) == (fam, key)


def test_names_are_unique_across_families():
  names = [name for name, _, _ in ALL_NAMES]
  assert len(names) == len(set(names))


def test_a_name_clash_is_refused(monkeypatch):
  # A family that would also answer to 'B0' (an NF-RegNet's short name).
  clash = dataclasses.replace(
    FAMILIES['NFNet'],
    name='Clash',
    title='Clash',
    variants={'B0': FAMILIES['NFNet'].variants['F0']},
    prefixes=('',),
  )
  monkeypatch.setitem(registry.FAMILIES, 'Clash', clash)
  with pytest.raises(ValueError, match="'B0' is both"):
    registry._model_names()  # pylint: disable=protected-access


@pytest.mark.parametrize(
  'name,family_name,key,canonical',
  [
    ('F0', 'NFNet', 'F0', 'F0'),
    ('NFNet-F0', 'NFNet', 'F0', 'F0'),
    ('NFNet-F7+', 'NFNet', 'F7+', 'F7+'),
    ('ResNet50', 'NFResNet', 'ResNet50', 'NF-ResNet50'),
    ('NF-ResNet50', 'NFResNet', 'ResNet50', 'NF-ResNet50'),
    ('B0', 'NFRegNet', 'B0', 'NF-RegNet-B0'),
    ('NF-RegNet-B0', 'NFRegNet', 'B0', 'NF-RegNet-B0'),
  ],
)
def test_short_and_long_names(name, family_name, key, canonical):
  """The names of family.py's docstring: NFNets `F0` (or `NFNet-F0`), NF-ResNets
  `NF-ResNet50` (or `ResNet50`), NF-RegNets `NF-RegNet-B0` (or `B0`)."""
  assert registry.resolve(name) == (FAMILIES[family_name], key)
  assert registry.canonical_name(name) == canonical


@pytest.mark.parametrize(
  'lookup',
  [
    registry.resolve,
    registry.family_of_variant,
    registry.variant_params,
    registry.canonical_name,
    registry.count_flops,
  ],
)
def test_unknown_name_lists_every_familys_variants(lookup):
  with pytest.raises(ValueError) as err:
    lookup('F9')
  msg = str(err.value)
  assert "'F9'" in msg
  for fam in FAMILIES.values():
    assert fam.title in msg
    assert all(fam.canonical_name(key) in msg for key in fam.variants)


def test_family_by_name():
  for name, fam in FAMILIES.items():
    assert registry.get_family(name) is fam
  with pytest.raises(ValueError) as err:
    registry.get_family('ResNet')
  assert all(name in str(err.value) for name in FAMILIES)


def test_family_of_root():
  for name, arch in helpers.ARCHITECTURES.items():
    assert registry.family_of_root(arch.root) is FAMILIES[name]
  assert registry.family_of_root('resnet') is None


def test_model_variant():
  config = model_config('NFRegNet', variant='NF-RegNet-B0', width=0.5)
  fam, key, kwargs = registry.model_variant(config)
  assert (fam, key, kwargs) == (FAMILIES['NFRegNet'], 'B0', {'width': 0.5})
  assert config.kwargs.variant == 'NF-RegNet-B0'  # the config is left alone
  assert registry.model_variant(model_config('NFNet', variant='NFNet-F1'))[:2] == (
    FAMILIES['NFNet'],
    'F1',
  )


@pytest.mark.parametrize('name', list(FAMILIES))
def test_model_variant_rejects_another_familys_variant(name):
  for other in FAMILIES.values():
    if other.name == name:
      continue
    variant = other.canonical_name(next(iter(other.variants)))
    with pytest.raises(ValueError, match=f'{other.name}.*{name}'):
      registry.model_variant(model_config(name, variant=variant))


@pytest.mark.parametrize('name,fam,key', ALL_NAMES)
def test_count_flops_is_the_familys_own(name, fam, key):
  assert registry.count_flops(name) == fam.count_flops(key)
  assert registry.count_flops(name, 64, 10) == fam.count_flops(key, 64, 10)
  assert registry.count_flops(name, **fam.defaults) == fam.count_flops(key)
  assert registry.count_flops(name, 48, num_classes=7, width=0.5) == fam.count_flops(
    key, 48, 7, width=0.5
  )


def test_mixed_precision_policy():
  assert registry.DTYPES == ('float32', 'bfloat16')
  policy = registry.mixed_precision_policy('bfloat16')
  assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (
    jnp.float32,
    jnp.bfloat16,
    jnp.float32,
  )
  assert registry.mixed_precision_policy('float32').compute_dtype == jnp.float32
  with pytest.raises(ValueError, match='float16.*float32, bfloat16'):
    registry.mixed_precision_policy('float16')


@pytest.mark.parametrize('name', list(FAMILIES))
def test_build_model_in_bfloat16(name):
  """float32 parameters, bfloat16 compute, float32 logits (2102.06171, section 3)."""
  variant, kwargs, _, _ = helpers.NARROW[name]
  config = model_config(name, **{**FAMILIES[name].defaults, 'variant': variant, **kwargs})
  f = registry.build_model(config, 10, 'bfloat16')
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(lambda k, x: f.init(k, x, False), jax.random.PRNGKey(0), x)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda p, x: f.apply(p, None, x, False), params, x)
  assert out['logits'].shape == (2, 10) and out['logits'].dtype == jnp.float32
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert n_params == registry.count_flops(variant, num_classes=10, **kwargs).params


def test_model_signature_and_count_params():
  config = model_config('NFNet', variant='F0', width=0.5)
  assert registry.model_signature(config, np.int64(10)) == {
    'family': 'NFNet',
    'num_classes': 10,
    'variant': 'F0',
    'width': 0.5,
  }
  params = {'a': {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}, 'c': {'s': jnp.zeros(())}}
  assert registry.count_params(params) == 10
  assert registry.count_params(hk.data_structures.to_haiku_dict(params)) == 10


@pytest.mark.parametrize(
  'name,family_name,key',
  [
    ('NF-RegNet-B0', 'NFRegNet', 'B0'),
    ('NF-ResNet50', 'NFResNet', 'ResNet50'),
    ('NFNet-F0', 'NFNet', 'F0'),
    ('F0', 'NFNet', 'F0'),
  ],
)
def test_configs_may_name_a_variant_by_any_of_its_names(name, family_name, key):
  """What model_variant accepts, build_model builds, and model_signature identifies
  it as the same model as its table key."""
  kwargs = helpers.NARROW[family_name][1]
  config = model_config(family_name, variant=name, **kwargs)
  canonical = model_config(family_name, variant=key, **kwargs)
  assert registry.model_signature(config, 10) == registry.model_signature(canonical, 10)
  assert registry.model_signature(config, 10)['variant'] == key

  def shapes(config):
    init = registry.build_model(config, 10).init
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    tree = jax.eval_shape(lambda k, x: init(k, x, False), jax.random.PRNGKey(0), x)
    return jax.tree.map(lambda s: s.shape, tree)

  assert shapes(config) == shapes(canonical)
  # Another family's variant is refused when the model is built, not when it runs.
  with pytest.raises(ValueError, match='model.name'):
    registry.build_model(model_config('NFNet', variant='B0'), 10)


# ---------------------------------------------------------------------------
# The batch-normalised baselines: named and counted like the NF families, kept out of
# FAMILIES (which the trainer and the weights tools iterate), built with state.
# ---------------------------------------------------------------------------
BASELINE_NAMES = [
  (name, fam, key) for fam in registry.BASELINES.values() for name, key in fam.names().items()
]


def test_baselines_are_named_like_the_families_but_kept_apart():
  assert models.BASELINES is registry.BASELINES
  assert 'BNResNet' in registry.BASELINES and not set(registry.BASELINES) & set(FAMILIES)
  assert all(fam.stateful for fam in registry.BASELINES.values())
  assert not any(fam.stateful for fam in FAMILIES.values())
  names = [name for name, _, _ in ALL_NAMES + BASELINE_NAMES]
  assert len(names) == len(set(names))
  for name, fam, key in BASELINE_NAMES:
    assert registry.resolve(name) == (fam, key)
    assert registry.canonical_name(name) == name == fam.prefixes[0] + key
    assert registry.variant_params(name) is fam.variants[key]
    assert registry.family_of_variant(name) == fam.name
    assert registry.get_family(fam.name) is fam
    assert registry.count_flops(name, 64, 10) == fam.count_flops(key, 64, 10)
  assert registry.resolve('BN-ResNet50') == (registry.BASELINES['BNResNet'], '50')
  assert registry.family_of_root('ResNet') is None  # the weights tools' families only
  # The short NF names keep meaning the NF families.
  assert registry.resolve('ResNet50')[0] is FAMILIES['NFResNet']


def test_unknown_name_lists_the_baselines_too():
  with pytest.raises(ValueError, match='BN-ResNet: BN-ResNet50, BN-ResNet101'):
    registry.resolve('BN-ResNet51')


def test_build_model_refuses_a_stateful_family_in_one_line():
  config = model_config('BNResNet', variant='BN-ResNet50')
  with pytest.raises(ValueError) as err:
    registry.build_model(config, 10)
  assert 'BN-ResNet' in str(err.value) and 'build_model_with_state' in str(err.value)
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_build_model_with_state_of_an_nf_family_is_the_stateless_model(name):
  """Empty state, the same parameters and the same outputs as build_model's."""
  variant, kwargs, _, _ = helpers.NARROW[name]
  config = model_config(name, variant=variant, **kwargs)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
  plain, stateful = registry.build_model(config, 10), registry.build_model_with_state(config, 10)
  params = plain.init(jax.random.PRNGKey(0), x, False)
  params_s, state = stateful.init(jax.random.PRNGKey(0), x, False)
  assert state == {}
  jax.tree.map(np.testing.assert_array_equal, params_s, params)
  out, new_state = stateful.apply(params, state, None, x, False, True)
  assert new_state == {}
  want = plain.apply(params, None, x, False, True)
  jax.tree.map(np.testing.assert_array_equal, out, want)


def test_a_baselines_config_builds_with_its_table_key():
  """config.model_config writes the table key ('50'), which BN-ResNet's names all prefix."""
  config = config_lib.model_config('BN-ResNet50')
  assert (config.name, config.kwargs.variant) == ('BNResNet', '50')
  fam, key, _ = registry.model_variant(config)
  assert (fam, key) == (registry.BASELINES['BNResNet'], '50')
  named = model_config('BNResNet', variant='BN-ResNet50')
  assert registry.model_signature(config, 10)['variant'] == '50'
  assert registry.model_variant(named)[:2] == (fam, key)
  with pytest.raises(ValueError, match='model.name'):
    registry.model_variant(model_config('NFResNet', variant='BN-ResNet50'))
