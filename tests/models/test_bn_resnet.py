"""BN-ResNet (DeepMind's released resnet.py; arXiv 2101.08692 section 2): the parameter tree
and count, per-stage shapes, batch-norm state in training and evaluation, and the per-block
signal statistics, against layouts and NumPy computations written here from the released
code's structure."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnet_jax import models
from nfnet_jax.models import bn_resnet
from nfnet_jax.models.batchnorm import BatchNorm
from tests import helpers

NARROW = dict(width=0.25)  # stem 16, stages 16/32/64/128, bottlenecks 4..32
SIZE, BATCH, CLASSES = 32, 4, 10


def expected_tree(depths, num_classes, width=4, preactivation=True):
  """The released ResNet's parameters: bias-free convs, BN scale/offset, a linear head."""
  root, block = 'ResNet', 'res_block_v2' if preactivation else 'res_block_v1'

  def bn(ch):
    return {'scale': (ch,), 'offset': (ch,)}

  in_ch = int(16 * width)
  tree = {f'{root}/~/initial_conv': {'w': (7, 7, 3, in_ch)}}
  if not preactivation:
    tree[f'{root}/~/initial_bn'] = bn(in_ch)
  i = 0
  for depth, stage_width in zip(depths, helpers.NF_RESNET_WIDTHS, strict=True):
    out_ch = int(stage_width * width)
    mid = out_ch // 4
    for b in range(depth):
      n = f'{root}/~/{block}' + (f'_{i}' if i else '')
      tree[f'{n}/~/conv0'] = {'w': (1, 1, in_ch, mid)}
      tree[f'{n}/~/conv1'] = {'w': (3, 3, mid, mid)}
      tree[f'{n}/~/conv2'] = {'w': (1, 1, mid, out_ch)}
      # V2 normalises each conv's input, V1 each conv's output.
      for k, ch in enumerate((in_ch, mid, mid) if preactivation else (mid, mid, out_ch)):
        tree[f'{n}/~/bn{k}'] = bn(ch)
      if b == 0:
        tree[f'{n}/~/conv_shortcut'] = {'w': (1, 1, in_ch, out_ch)}
        if not preactivation:
          # Built inside the block's __call__ in the released code, hence no `~`.
          tree[f'{n}/shortcut_bn'] = bn(out_ch)
      in_ch, i = out_ch, i + 1
  if preactivation:
    tree[f'{root}/~/final_bn'] = bn(in_ch)
  tree[f'{root}/~/linear'] = {'w': (in_ch, num_classes), 'b': (num_classes,)}
  return tree


def transformed(capture=None, **kwargs):
  """hk.transform_with_state of a BNResNet; `capture` collects the calls of the modules of
  the given types as {module name: (input, output)}."""

  def fn(x, is_training):
    def interceptor(method, args, kw, context):
      out = method(*args, **kw)
      if capture is not None and context.method_name == '__call__':
        if isinstance(context.module, capture['types']):
          capture['calls'][context.module.module_name] = (args[0], out)
      return out

    with hk.intercept_methods(interceptor):
      return bn_resnet.BNResNet(CLASSES, **kwargs)(x, is_training, return_metrics=True)

  return hk.transform_with_state(fn)


def shapes(tree):
  return {m: {k: tuple(v.shape) for k, v in p.items()} for m, p in tree.items()}


def images(batch=BATCH, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, SIZE, SIZE, 3)), 'float32')


# ---------------------------------------------------------------------------
# Parameters and cost.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('preactivation', [True, False])
def test_resnet50_parameter_tree_and_count(preactivation):
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  f = transformed(preactivation=preactivation)
  params, state = jax.eval_shape(lambda k, x: f.init(k, x, True), jax.random.PRNGKey(0), x)
  expected = expected_tree(helpers.NF_RESNET_DEPTHS['ResNet50'], CLASSES, 4, preactivation)
  assert shapes(params) == expected
  # Moving mean and variance per BN channel, as state.
  assert shapes(state) == {
    m: {'moving_mean': p['scale'], 'moving_variance': p['scale']}
    for m, p in expected.items()
    if 'scale' in p
  }
  n = models.count_params(params) + 2048 * 990 + 990  # the classifier at 1000 classes
  # The familiar ResNet-50 count (25,557,032) is V1's. V2 has no BN on the 4 projections
  # (256 + 512 + 1024 + 2048 = 3,840 channels, 7,680 parameters); its other BNs normalise
  # conv inputs instead of outputs, the same channels over the network (block inputs are
  # the previous outputs, and a final BN of 2048 takes the place of the stem's BN of 64).
  assert n == helpers.BN_RESNET50_PARAMS - (2 * 3840 if preactivation else 0)
  assert models.count_flops('BN-ResNet50', preactivation=preactivation).params == n


@pytest.mark.parametrize('variant', list(bn_resnet.BN_RESNET_VARIANTS))
def test_every_variant_follows_the_released_layout(variant):
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  f = transformed(variant=variant, **NARROW)
  params, _ = jax.eval_shape(lambda k, x: f.init(k, x, True), jax.random.PRNGKey(0), x)
  depths = helpers.NF_RESNET_DEPTHS['ResNet' + variant]
  assert shapes(params) == expected_tree(depths, CLASSES, **NARROW)
  cost = models.count_flops(f'BN-ResNet{variant}', 32, CLASSES, **NARROW)
  assert cost.params == models.count_params(params)


def test_macs_are_the_traced_models():
  """MACs = output pixels x weights of every conv, plus the classifier (batch norm and the
  other elementwise work not counted, as in 2102.06171 table 3)."""
  calls = {}
  capture = dict(types=(hk.Conv2D, hk.Linear), calls=calls)
  f = transformed(capture, **NARROW)
  params, _ = jax.eval_shape(
    lambda k, x: f.init(k, x, True),
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, 48, 48, 3), 'float32'),
  )
  macs = sum(
    int(np.prod(out.shape[1:-1])) * int(np.prod(params[m]['w'].shape))
    for m, (_, out) in calls.items()
  )
  assert macs == models.count_flops('BN-ResNet50', 48, CLASSES, **NARROW).macs
  # The familiar ~4.1 GMACs of a ResNet-50 at 224 px (He et al. 2016, table 1: 3.8 GFLOPs,
  # which omit the shortcut projections).
  assert 4.0e9 < models.count_flops('BN-ResNet50').macs < 4.2e9


# ---------------------------------------------------------------------------
# The forward pass.
# ---------------------------------------------------------------------------
def test_per_stage_shapes_and_signal_statistics():
  """Each block's output has its stage's width and stride (stem /4, then /1, /2, /2, /2);
  `block_{i}` holds the NumPy statistics of that output and of the residual branch."""
  calls = {}
  f = transformed(dict(types=(bn_resnet.ResBlockV2,), calls=calls), **NARROW)
  x = images()
  params, state = f.init(jax.random.PRNGKey(0), x, True)
  out, _ = f.apply(params, state, None, x, True)
  _, plan = bn_resnet.stage_plan('50', NARROW['width'])
  side = SIZE // 4
  assert len(calls) == len(plan) == 16
  for i, ((in_ch, out_ch, stride), (name, (inp, (y, branch)))) in enumerate(
    zip(plan, calls.items())  # in call order
  ):
    side //= stride
    assert inp.shape == (BATCH, side * stride, side * stride, in_ch), name
    assert y.shape == branch.shape == (BATCH, side, side, out_ch), name
    y, branch = np.asarray(y, np.float64), np.asarray(branch, np.float64)
    stats = out[f'block_{i}']
    np.testing.assert_allclose(stats['avg_sq_mean'], np.mean(y.mean((0, 1, 2)) ** 2), rtol=1e-4)
    np.testing.assert_allclose(stats['avg_var'], np.mean(y.var((0, 1, 2))), rtol=1e-4)
    np.testing.assert_allclose(stats['res_avg_var'], np.mean(branch.var((0, 1, 2))), rtol=1e-4)
  assert [o for _, o, _ in plan] == [16] * 3 + [32] * 4 + [64] * 6 + [128] * 3
  assert out['pool'].shape == (BATCH, 128) and out['logits'].shape == (BATCH, CLASSES)
  # The released classifier starts at zero.
  np.testing.assert_array_equal(out['logits'], 0)


def test_batch_norm_state_updates_in_training_and_is_used_in_evaluation():
  calls = {}
  f = transformed(dict(types=(BatchNorm,), calls=calls), **NARROW)
  x = images()
  params, state = f.init(jax.random.PRNGKey(0), x, True)
  assert all(
    np.all(s['moving_mean'] == 0) and np.all(s['moving_variance'] == 1) for s in state.values()
  )
  # Training: moving = 0.9 moving + 0.1 batch statistic (the released decay), per channel.
  _, trained = f.apply(params, state, None, x, True)
  assert set(calls) == set(state)
  for name, (inp, _) in calls.items():
    inp = np.asarray(inp, np.float64)
    np.testing.assert_allclose(trained[name]['moving_mean'], 0.1 * inp.mean((0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(
      trained[name]['moving_variance'], 0.9 + 0.1 * inp.var((0, 1, 2)), rtol=1e-5
    )
  # Evaluation leaves the state alone and normalises each example with it: an example's
  # features do not depend on the rest of the batch, and they do depend on the state.
  out, after = f.apply(params, trained, None, x, False)
  jax.tree.map(np.testing.assert_array_equal, after, trained)
  alone, _ = f.apply(params, trained, None, x[:1], False)
  np.testing.assert_allclose(alone['pool'], out['pool'][:1], rtol=1e-4, atol=1e-5)
  fresh, _ = f.apply(params, state, None, x, False)
  assert not np.allclose(fresh['pool'], out['pool'], rtol=1e-3)
  # Training normalises with the batch's statistics: the rest of the batch matters.
  train_alone, _ = f.apply(params, state, None, x[:2], True)
  train_all, _ = f.apply(params, state, None, x, True)
  assert not np.allclose(train_alone['pool'], train_all['pool'][:2], rtol=1e-3)


def test_registry_builds_it_with_state_only():
  config = ml_collections.ConfigDict(
    dict(name='BNResNet', kwargs=dict(variant='BN-ResNet50', **NARROW))
  )
  with pytest.raises(ValueError, match='BN-ResNet.*build_model_with_state'):
    models.build_model(config, CLASSES)
  f = models.build_model_with_state(config, CLASSES, 'bfloat16')
  x = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
  params, state = jax.eval_shape(lambda k, x: f.init(k, x, True), jax.random.PRNGKey(0), x)
  assert {p.dtype for p in jax.tree.leaves((params, state))} == {jnp.dtype(jnp.float32)}
  (out, new_state) = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, True), params, state, x)
  assert out['logits'].dtype == jnp.float32
  assert jax.tree.map(lambda s: s.dtype, new_state) == jax.tree.map(lambda s: s.dtype, state)
