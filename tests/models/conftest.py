"""Fixtures of the model tests: one narrow network per family, run once per session."""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.models import FAMILIES, Family, layers
from tests import helpers

NARROW_CLASSES = 10
SKIP_GAINS = (0.0, 0.7, 1.0)


@dataclasses.dataclass(frozen=True)
class NarrowRun:
  """A narrow network on N(0, 1) images, in eval mode with return_metrics=True.

  Attributes:
    family: the registry's record.
    arch: the published architecture (tests/helpers.py).
    variant, kwargs, size, batch, classes: how it was built and fed.
    params: parameters distributed as at initialisation (skip_gain 0).
    runs: skip_gain -> (model outputs, {module name: (call input, call output)}),
      with every block's skip_gain set to 0 (as initialised), 0.7 and 1.
  """

  family: Family
  arch: helpers.Architecture
  variant: str
  kwargs: dict
  size: int
  batch: int
  classes: int
  params: dict
  runs: dict

  @property
  def num_blocks(self) -> int:
    return sum(self.arch.depths[self.variant])

  def stage_of_block(self) -> np.ndarray:
    return np.repeat(np.arange(4), self.arch.depths[self.variant])


def captured_forward(fam: Family, variant: str, num_classes: int, **kwargs):
  """The model's eval forward pass, also returning each module's call input and output."""

  def fn(x):
    caps = {}

    def interceptor(method, args, kw, context):
      out = method(*args, **kw)
      if context.method_name == '__call__' and context.module.module_name != fam.root:
        caps[context.module.module_name] = (args[0], out)
      return out

    with hk.intercept_methods(interceptor):
      out = fam.model(num_classes, variant=variant, **kwargs)(x, False, return_metrics=True)
    return out, caps

  return hk.without_apply_rng(hk.transform(fn))


def _narrow_run(name: str) -> NarrowRun:
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  variant, kwargs, size, batch = helpers.NARROW[name]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
  f = captured_forward(fam, variant, NARROW_CLASSES, **kwargs)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  params = helpers.init_like_params(shapes, rng, fam.classifier_module())
  # The native lowering compiles fastest; the tests compare values, not lowerings.
  with layers.conv_impl('native'):
    apply = helpers.compile_lowered(f.apply, params, x)
  runs = {g: apply(helpers.with_skip_gain(params, g), x) for g in SKIP_GAINS}
  return NarrowRun(fam, arch, variant, kwargs, size, batch, NARROW_CLASSES, params, runs)


@pytest.fixture(scope='session')
def narrow_run():
  """narrow_run(family name) -> NarrowRun, computed once per family per session."""
  cache = {}

  def get(name: str) -> NarrowRun:
    if name not in cache:
      cache[name] = _narrow_run(name)
    return cache[name]

  return get
