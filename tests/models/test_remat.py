"""Rematerialisation (`config.model.remat`): every family's residual blocks under hk.remat.

Recomputing activations changes how the backward pass is computed, never what it
computes: parameters (names, shapes, initial values), outputs and gradients must be
those of the plain network, and the weights' identity (`model_signature`) must not
mention it.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import config as config_lib
from nfnet_jax import models
from nfnet_jax.models import FAMILIES, layers
from tests import helpers

# Narrow variants, with stochastic depth and dropout on: the rng draws inside the
# recomputed blocks are part of what must not change.
CASES = {
  'NFNet': ('F0', dict(width=0.0625, group_size=8)),
  'NFResNet': ('ResNet50', dict(width=0.125)),
  'NFRegNet': ('B0', dict(width=0.25)),
}
SIZE, BATCH, CLASSES = 32, 2, 10


def build(name: str, remat: bool) -> hk.Transformed:
  variant, kwargs = CASES[name]
  config = config_lib.model_config(FAMILIES[name].canonical_name(variant))
  config.kwargs.update(kwargs, stochdepth_rate=0.2, drop_rate=0.2)
  config.remat = remat
  return models.build_model(config, CLASSES)


def inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((BATCH, SIZE, SIZE, 3)), jnp.float32)
  projection = jnp.asarray(rng.standard_normal((CLASSES,)), jnp.float32)
  return x, projection


def loss_fn(model, projection, x):
  def loss(params):
    out = model.apply(params, jax.random.PRNGKey(3), x, is_training=True)
    return jnp.sum(out['logits'] @ projection) + jnp.sum(out['pool'] ** 2)

  return loss


def param_shapes(name: str, remat: bool, x) -> dict:
  init = build(name, remat).init
  return jax.eval_shape(lambda key: init(key, x, is_training=True), jax.random.PRNGKey(0))


@pytest.mark.parametrize('name', sorted(CASES))
def test_remat_keeps_parameters_outputs_and_gradients(name):
  x, projection = inputs()
  shapes = {remat: param_shapes(name, remat, x) for remat in (False, True)}
  # The same tree, name for name and shape for shape: checkpoints and released
  # weights load into either.
  assert jax.tree.structure(shapes[True]) == jax.tree.structure(shapes[False])
  assert jax.tree.leaves(shapes[True]) == jax.tree.leaves(shapes[False])

  # Non-zero skip gains, so that every residual branch contributes and gets a gradient.
  params = helpers.random_params(shapes[False], np.random.default_rng(1), skip_gain=0.6)
  results = {}
  with layers.conv_impl('native'):  # compiles fastest; the lowering is not under test
    for remat in (False, True):
      grad_fn = jax.value_and_grad(loss_fn(build(name, remat), projection, x))
      results[remat] = helpers.compile_lowered(grad_fn, params)(params)
  (loss_plain, grads_plain), (loss_remat, grads_remat) = results[False], results[True]
  assert np.isfinite(loss_plain)
  np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
  block = f'{FAMILIES[name].root}/~/{FAMILIES[name].block}_3'
  assert float(jnp.max(jnp.abs(grads_plain[block]['skip_gain']))) > 0
  # Recomputation may fuse differently: float32 rounding only.
  jax.tree.map(lambda a, b: helpers.assert_close(a, b, rtol=1e-5), grads_remat, grads_plain)


def _remat_equations(jaxpr) -> int:
  return sum(
    'remat' in eqn.primitive.name or 'checkpoint' in eqn.primitive.name for eqn in jaxpr.eqns
  )


@pytest.mark.parametrize('name', sorted(CASES))
def test_remat_wraps_each_residual_block(name):
  """The gradient's program recomputes one rematerialised region per residual block
  (the published depths), and none without remat."""
  x, projection = inputs()
  variant, _ = CASES[name]
  num_blocks = sum(helpers.ARCHITECTURES[name].depths[variant])
  params = param_shapes(name, False, x)
  for remat, expected in ((False, 0), (True, num_blocks)):
    jaxpr = jax.make_jaxpr(jax.grad(loss_fn(build(name, remat), projection, x)))(params)
    assert _remat_equations(jaxpr.jaxpr) == expected, remat


def test_remat_is_not_part_of_the_weights_identity():
  config = config_lib.model_config('F0')
  plain = models.model_signature(config, 10)
  config.remat = True
  assert models.model_signature(config, 10) == plain
  assert 'remat' not in plain
