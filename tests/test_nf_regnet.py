"""Tests for nfnet_jax.nf_regnet against the spec (shared/reference/nfnet-spec.md, section 2).

Expected shapes, names and counts are derived here from the spec's text; the
block formula is re-computed in NumPy (float64). Shapes are traced with
jax.eval_shape; the one whole-network forward pass is narrow, at 32 px.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import layers, nf_regnet
from tests.test_nf_resnet import (block_name, compile_lowered, count, np_conv, np_se,
                                  random_params, recurrence_betas, traced_shapes)

# The spec's table, typed in.
SPEC_WIDTHS = {
    'B0': [48, 104, 208, 440], 'B1': [48, 104, 208, 440], 'B2': [56, 112, 232, 488],
    'B3': [56, 128, 248, 528], 'B4': [64, 144, 288, 616], 'B5': [80, 168, 336, 704],
    'B6': [88, 184, 376, 792], 'B7': [96, 208, 416, 880], 'B8': [104, 232, 456, 968],
}
SPEC_DEPTHS = {
    'B0': [1, 3, 6, 6], 'B1': [2, 4, 7, 7], 'B2': [2, 4, 8, 8], 'B3': [2, 5, 9, 9],
    'B4': [2, 6, 11, 11], 'B5': [3, 7, 14, 14], 'B6': [3, 8, 16, 16],
    'B7': [4, 10, 19, 19], 'B8': [4, 11, 22, 22],
}
SPEC_SIZES = {'B0': (192, 224), 'B1': (224, 256), 'B2': (240, 272), 'B3': (288, 320),
              'B4': (320, 384), 'B5': (384, 456), 'B6': (448, 528), 'B7': (512, 600),
              'B8': (600, 672)}
SPEC_DROPOUT = {'B0': 0.2, 'B1': 0.2, 'B2': 0.3, 'B3': 0.3, 'B4': 0.4, 'B5': 0.4,
                'B6': 0.5, 'B7': 0.5, 'B8': 0.5}
SILU_GAMMA = 1.7881293296813965
TOP = 'NF_RegNet'


def expected_tree(variant, num_classes, width=0.75, se_from='bottleneck',
                  round_up=False, first_shortcut=True):
  """The spec's text as a parameter tree. The keyword arguments select
  alternative readings, to show that only the spec's one hits the paper's count."""
  def conv(k, cin, cout, groups=1):
    return {'w': (k, k, cin // groups, cout), 'gain': (cout,), 'bias': (cout,)}

  widths = [int(w * width) for w in SPEC_WIDTHS[variant]]
  in_ch = widths[0]
  tree = {f'{TOP}/~/initial_conv': conv(3, 3, in_ch)}
  i = 0
  for depth, out_ch in zip(SPEC_DEPTHS[variant], widths):
    for b in range(depth):
      n = f'{TOP}/~/' + block_name('nf_block', i)
      mid = int(in_ch * (1 if i == 0 else 2.25))
      groups = -(-mid // 8) if round_up else max(1, mid // 8)
      mid = 8 * groups
      tree[n] = {'skip_gain': ()}
      tree[n + '/~/conv0'] = conv(1, in_ch, mid)
      tree[n + '/~/conv1'] = conv(3, mid, mid, groups)
      hidden = int({'bottleneck': mid, 'input': in_ch, 'output': out_ch}[se_from] * 0.5)
      tree[n + '/~/squeeze_excite/~/linear'] = {'w': (mid, hidden), 'b': (hidden,)}
      tree[n + '/~/squeeze_excite/~/linear_1'] = {'w': (hidden, mid), 'b': (mid,)}
      tree[n + '/~/conv2'] = conv(1, mid, out_ch)
      if (b == 0 or in_ch != out_ch) and (first_shortcut or i > 0):   # stride 2 or new width
        tree[n + '/~/conv_shortcut'] = conv(1, in_ch, out_ch)
      in_ch, i = out_ch, i + 1
  final = int(1280 * in_ch / 440)
  tree[f'{TOP}/~/final_conv'] = conv(1, in_ch, final)
  tree[f'{TOP}/~/linear'] = {'w': (final, num_classes), 'b': (num_classes,)}
  return tree


# ---------------------------------------------------------------------------
# Variants, constructor, inputs.
# ---------------------------------------------------------------------------
def test_variant_table_matches_spec():
  assert set(nf_regnet.NF_REGNET_VARIANTS) == set(SPEC_WIDTHS)
  for v, p in nf_regnet.NF_REGNET_VARIANTS.items():
    assert list(p['width']) == SPEC_WIDTHS[v] and list(p['depth']) == SPEC_DEPTHS[v]
    assert (p['train_imsize'], p['test_imsize']) == SPEC_SIZES[v]
    assert p['drop_rate'] == SPEC_DROPOUT[v]


def test_unknown_variant_lists_valid_ones():
  with pytest.raises(ValueError) as err:
    traced_shapes(lambda: nf_regnet.NFRegNet(10, 'B9'))
  msg = str(err.value)
  assert 'B9' in msg and all(v in msg for v in SPEC_WIDTHS)
  with pytest.raises(ValueError, match='B0'):
    nf_regnet.block_specs('b0')


def test_bad_inputs_raise():
  f = hk.transform(lambda x: nf_regnet.NFRegNet(10, width=0.25)(x, False))
  with pytest.raises(ValueError, match='rank 4'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))
  with pytest.raises(TypeError, match='uint8'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))


# ---------------------------------------------------------------------------
# Parameter trees and counts.
# ---------------------------------------------------------------------------
def test_b0_has_8_595_372_params():
  got = traced_shapes(lambda: nf_regnet.NFRegNet(1000))
  assert got == expected_tree('B0', 1000)
  assert count(got) == 8_595_372
  # Spot checks typed from the spec's prose.
  assert got[f'{TOP}/~/initial_conv']['w'] == (3, 3, 3, 36)        # int(48 * 0.75)
  first = f'{TOP}/~/nf_block'
  assert f'{TOP}/~/nf_block_0' not in got
  assert got[first + '/~/conv0']['w'] == (1, 1, 36, 32)             # 36 -> 4 groups of 8
  assert got[first + '/~/conv1']['w'] == (3, 3, 8, 32)
  assert got[first + '/~/squeeze_excite/~/linear']['w'] == (32, 16)
  assert got[first + '/~/conv_shortcut']['w'] == (1, 1, 36, 36)     # stride 2, same width
  assert got[f'{TOP}/~/nf_block_1/~/conv0']['w'] == (1, 1, 36, 80)  # 81 -> 80
  assert got[f'{TOP}/~/final_conv']['w'] == (1, 1, 330, 960)
  assert got[f'{TOP}/~/linear']['w'] == (960, 1000)
  with_shortcut = [i for i in range(16)
                   if f'{TOP}/~/{block_name("nf_block", i)}/~/conv_shortcut' in got]
  assert with_shortcut == [0, 1, 4, 10]


@pytest.mark.parametrize('reading,n', [
    (dict(), 8_595_372),
    (dict(first_shortcut=False), 8_594_004),
    (dict(round_up=True), 8_756_700),
    (dict(se_from='input'), 6_662_774),
    (dict(se_from='output'), 6_739_241)])
def test_only_the_spec_reading_hits_the_count(reading, n):
  """Pure arithmetic: the details the count pins down (SE hidden width from the
  bottleneck, groups rounded down, a shortcut on the very first block)."""
  assert count(expected_tree('B0', 1000, **reading)) == n


@pytest.mark.parametrize('variant', sorted(SPEC_WIDTHS))
def test_every_variant_builds_with_defaults(variant):
  got = traced_shapes(lambda: nf_regnet.NFRegNet(1000, variant))
  assert got == expected_tree(variant, 1000)
  assert count(got) == nf_regnet.count_flops(variant).params


# ---------------------------------------------------------------------------
# Betas and stochastic depth rates.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['B0', 'B8'])
@pytest.mark.parametrize('alpha', [0.2, 0.5])
def test_betas_follow_recurrence(variant, alpha):
  _, specs = nf_regnet.block_specs(variant, alpha=alpha)
  np.testing.assert_allclose([s.beta for s in specs],
                             recurrence_betas(SPEC_DEPTHS[variant], alpha), rtol=1e-12)
  n = len(specs)
  np.testing.assert_allclose([s.stochdepth_rate for s in specs],
                             [0.1 * i / n for i in range(n)], rtol=1e-12)
  assert [s.stride for s in specs] == [
      2 if b == 0 else 1 for d in SPEC_DEPTHS[variant] for b in range(d)]


def test_model_blocks_carry_the_betas():
  seen = []

  def fn(x):
    model = nf_regnet.NFRegNet(10, alpha=0.5, stochdepth_rate=0.3, width=0.25)
    seen.extend((b.beta, b.stochdepth_rate) for b in model.blocks)
    return model(x, False)

  with layers.conv_impl('native'):
    jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  np.testing.assert_allclose([b for b, _ in seen],
                             recurrence_betas(SPEC_DEPTHS['B0'], 0.5), rtol=1e-12)
  np.testing.assert_allclose([r for _, r in seen], [0.3 * i / 16 for i in range(16)])


# ---------------------------------------------------------------------------
# The block, against NumPy.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('stride,in_ch', [(2, 16), (1, 16), (1, 8)])
def test_block_formula(stride, in_ch):
  """out = act(x) * beta; shortcut = 2x2 avg-pool then 1x1 conv when strided, the
  1x1 conv when only channels change, else x; conv0 -> act -> grouped conv1
  (strided) -> 2 * se * out -> act -> conv2; return branch * skip_gain * alpha +
  shortcut."""
  out_ch, mid, groups, beta, alpha = 16, 24, 3, 0.8, 0.3
  f = hk.without_apply_rng(hk.transform(lambda x: nf_regnet.NFRegNetBlock(
      in_ch, out_ch, mid, groups, stride=stride, beta=beta, alpha=alpha)(x, False)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 6, 6, in_ch)), jnp.float32)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  params = random_params(shapes, rng)
  y, branch = jax.jit(f.apply)(params, x)

  p = {m.split('/~/', 1)[1] if '/~/' in m else 'self': v for m, v in params.items()}
  assert p['squeeze_excite/~/linear']['w'].shape == (mid, mid // 2)
  act = lambda v: v / (1 + np.exp(-v)) * SILU_GAMMA
  x64 = np.asarray(x, np.float64)
  out = act(x64) * beta
  if stride > 1:
    pooled = out.reshape(3, 3, 2, 3, 2, in_ch).mean(axis=(2, 4))
    shortcut = np_conv(pooled, p['conv_shortcut'])
  elif in_ch != out_ch:
    shortcut = np_conv(out, p['conv_shortcut'])
  else:
    assert 'conv_shortcut' not in p
    shortcut = x64
  h = np_conv(out, p['conv0'])
  h = np_conv(act(h), p['conv1'], stride, groups)
  h = 2 * np_se(h, p['squeeze_excite/~/linear'], p['squeeze_excite/~/linear_1']) * h
  h = np_conv(act(h), p['conv2'])
  np.testing.assert_allclose(branch, h, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y, h * 0.7 * alpha + shortcut, rtol=1e-4, atol=1e-4)


def test_block_stochastic_depth_only_in_training():
  batch = 64
  f = hk.transform(lambda x, t: nf_regnet.NFRegNetBlock(
      16, 16, 16, 2, stochdepth_rate=0.5)(x, t))
  x = jnp.asarray(np.tile(np.random.default_rng(0).standard_normal((1, 4, 4, 16)),
                          (batch, 1, 1, 1)), jnp.float32)
  params = jax.jit(f.init, static_argnums=2)(jax.random.PRNGKey(0), x, True)
  assert float(params['nf_block']['skip_gain']) == 0.0
  params = {**params, 'nf_block': {'skip_gain': jnp.float32(1.0)}}
  apply = jax.jit(f.apply, static_argnums=3)
  _, b_eval = apply(params, jax.random.PRNGKey(1), x, False)
  _, b_train = apply(params, jax.random.PRNGKey(1), x, True)
  b_eval, b_train = np.asarray(b_eval), np.asarray(b_train)
  assert np.abs(b_eval).max() > 1e-2
  kept = np.all(b_train == b_eval, axis=(1, 2, 3))          # kept whole, unscaled
  dropped = np.all(b_train == 0, axis=(1, 2, 3))
  assert np.all(kept ^ dropped) and 0.2 < dropped.mean() < 0.8


# ---------------------------------------------------------------------------
# The whole network, narrow, on 32 px; the head.
# ---------------------------------------------------------------------------
def test_forward_narrow():
  """B0 at width 0.25: stem 12, stages 12/26/52/110 channels, final conv 320.
  Random parameters, every branch on; total stride 32, so 32 px ends at 1 x 1."""
  batch, classes = 4, 10
  sizes = {}

  def fn(x):
    def capture(method, args, kwargs, context):
      out = method(*args, **kwargs)
      if (isinstance(context.module, nf_regnet.NFRegNetBlock)
          and context.method_name == '__call__'):
        sizes[context.module.module_name] = out[0].shape
      return out

    with hk.intercept_methods(capture):
      return nf_regnet.NFRegNet(classes, width=0.25)(x, False, return_metrics=True)

  f = hk.transform(fn)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 32, 32, 3)), jnp.float32)
  with layers.conv_impl('native'):
    shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
    params = random_params(shapes, np.random.default_rng(1), skip_gain=1.0)
    out = compile_lowered(f.apply, params, None, x)(params, None, x)
  assert out['logits'].shape == (batch, classes)
  assert out['pool'].shape == (batch, 320)
  assert np.all(np.isfinite(out['logits'])) and np.abs(out['logits']).max() > 0
  assert sorted(k for k in out if k.startswith('block_')) == sorted(
      f'block_{i}' for i in range(16))
  for i in range(16):
    assert set(out[f'block_{i}']) == {'avg_sq_mean', 'avg_var', 'res_avg_var'}
    assert all(np.isfinite(v) for v in out[f'block_{i}'].values())
  got = [sizes[f'{TOP}/~/' + block_name('nf_block', i)][1:] for i in range(16)]
  want = [(8, 8, 12)] + [(4, 4, 26)] * 3 + [(2, 2, 52)] * 6 + [(1, 1, 110)] * 6
  assert got == want


@pytest.mark.parametrize('variant,drop_rate,want', [
    ('B0', None, 0.2), ('B6', None, 0.5), ('B0', 0.0, 0.0)])
def test_head_dropout_and_classifier_init(variant, drop_rate, want):
  """final_conv -> act -> mean (= pool) -> dropout (training only) -> linear,
  whose weight starts at zero. Stem and blocks are intercepted as identities."""
  def skip(method, args, kwargs, context):
    if context.method_name == '__call__' and (
        isinstance(context.module, nf_regnet.NFRegNetBlock)
        or context.module.module_name == f'{TOP}/~/initial_conv'):
      return (args[0], args[0]) if 'block' in context.module.module_name else args[0]
    return method(*args, **kwargs)

  def fn(x, is_training):
    seen = {}

    def capture(method, args, kwargs, context):
      if (context.method_name == '__call__'
          and context.module.module_name == f'{TOP}/~/linear'):
        seen['fc_in'] = args[0]
      return method(*args, **kwargs)

    with hk.intercept_methods(skip), hk.intercept_methods(capture):
      out = nf_regnet.NFRegNet(10, variant, width=0.125, drop_rate=drop_rate)(
          x, is_training)
    return out, seen['fc_in']

  f = hk.transform(fn)
  last = int(SPEC_WIDTHS[variant][-1] * 0.125)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 2, 2, last)), jnp.float32)
  params = f.init(jax.random.PRNGKey(0), x, True)
  final = 1280 * last // 440
  assert params[f'{TOP}/~/linear']['w'].shape == (final, 10)
  np.testing.assert_array_equal(params[f'{TOP}/~/linear']['w'], 0)
  np.testing.assert_array_equal(params[f'{TOP}/~/linear']['b'], 0)
  (out, fc_in) = f.apply(params, jax.random.PRNGKey(3), x, True)
  pool, fc_in = np.asarray(out['pool']), np.asarray(fc_in)
  assert pool.shape == (8, final)
  if want:
    kept = fc_in != 0
    np.testing.assert_allclose(fc_in[kept], pool[kept] / (1 - want), rtol=1e-6)
    assert 1 - kept.mean() == pytest.approx(want, abs=0.1)
  else:
    np.testing.assert_array_equal(fc_in, pool)
  (out, fc_in) = f.apply(params, None, x, False)
  np.testing.assert_array_equal(fc_in, out['pool'])
