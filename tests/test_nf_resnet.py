"""Tests for nfnet_jax.nf_resnet against the spec (shared/reference/nfnet-spec.md, section 2).

Expected shapes, names and counts are derived here from the spec's text; the
block formula is re-computed in NumPy (float64). Shapes are traced with
jax.eval_shape; the one whole-network forward pass is narrow, at 32 px, compiled
at XLA backend optimisation level 0.
"""
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import layers, nf_resnet

SPEC_DEPTHS = {
    'ResNet50': [3, 4, 6, 3], 'ResNet101': [3, 4, 23, 3], 'ResNet152': [3, 8, 36, 3],
    'ResNet200': [3, 24, 36, 3], 'ResNet288': [24] * 4, 'ResNet600': [50] * 4,
}
BASE_WIDTHS = [64, 128, 256, 512]
STRIDES = [1, 2, 2, 2]
RELU_GAMMA = 1.7139588594436646
TOP = 'NF_ResNet'


# ---------------------------------------------------------------------------
# Helpers shared with test_nf_regnet.py: NumPy re-computations (float64).
# ---------------------------------------------------------------------------
def block_name(prefix, i):
  return prefix + ('' if i == 0 else f'_{i}')


def recurrence_betas(depths, alpha=0.2):
  """Spec: beta = 1/expected_std; expected_std starts at 1, is reset to 1 after
  each stage's first block, else grows as sqrt(std^2 + alpha^2)."""
  betas, expected_std = [], 1.0
  for depth in depths:
    for i in range(depth):
      betas.append(1.0 / expected_std)
      if i == 0:
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
  return betas


def np_ws(p):
  """Scaled weight standardization of a conv's params, float64."""
  w = np.asarray(p['w'], np.float64)
  fan_in = np.prod(w.shape[:-1])
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = w.var(axis=(0, 1, 2), keepdims=True)
  return (w - mean) / np.sqrt(np.maximum(var * fan_in, 1e-4)) * np.asarray(p['gain'])


def np_conv(x, p, stride=1, groups=1):
  """NHWC x HWIO WS-conv with TF 'SAME' padding, grouped, plus bias; float64."""
  w = np_ws(p)
  kh, kw, cin_g, cout = w.shape
  n, h, wd, _ = x.shape
  oh, ow = -(-h // stride), -(-wd // stride)
  ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - wd, 0)
  xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = np.zeros((n, oh, ow, cout))
  cout_g = cout // groups
  for g in range(groups):
    xg = xp[..., g * cin_g:(g + 1) * cin_g]
    wg = w[..., g * cout_g:(g + 1) * cout_g]
    for i in range(kh):
      for j in range(kw):
        patch = xg[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
        out[..., g * cout_g:(g + 1) * cout_g] += patch @ wg[i, j]
  return out + np.asarray(p['bias'])


def np_se(x, p0, p1):
  """Squeeze-excite gate: mean -> linear -> plain ReLU -> linear -> sigmoid."""
  h = x.mean(axis=(1, 2)) @ np.asarray(p0['w'], np.float64) + np.asarray(p0['b'])
  h = np.maximum(h, 0) @ np.asarray(p1['w'], np.float64) + np.asarray(p1['b'])
  return (1 / (1 + np.exp(-h)))[:, None, None, :]


def random_params(shapes, rng, skip_gain=0.7):
  """Non-trivial values everywhere (so a wrong wiring shows)."""
  params = {}
  for mod, p in shapes.items():
    params[mod] = {}
    for name, s in p.items():
      if name == 'skip_gain':
        v = np.full(s.shape, skip_gain)
      elif name == 'gain':
        v = 1 + 0.2 * rng.standard_normal(s.shape)
      elif name == 'w':
        v = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
      else:
        v = 0.1 * rng.standard_normal(s.shape)
      params[mod][name] = jnp.asarray(v, jnp.float32)
  return params


def compile_lowered(fn, *args):
  """jit at XLA backend optimisation level 0: same function, faster compile."""
  return jax.jit(fn).lower(*args).compile(
      compiler_options={'xla_backend_optimization_level': 0})


def zeros_creator(next_creator, shape, dtype, init, context):
  return next_creator(shape, dtype, jnp.zeros)


def traced_shapes(make_model, image_size=32):
  """{module: {param: shape}} of a model via jax.eval_shape (never materialised;
  zero initializers and the native conv lowering just make tracing faster)."""
  def fn(x):
    with hk.custom_creator(zeros_creator):
      return make_model()(x, False)
  with layers.conv_impl('native'):
    tree = jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return {m: {k: tuple(v.shape) for k, v in p.items()} for m, p in tree.items()}


def count(shapes):
  return sum(int(np.prod(s)) for p in shapes.values() for s in p.values())


# ---------------------------------------------------------------------------
# The spec's text, as a parameter tree.
# ---------------------------------------------------------------------------
def expected_tree(depths, num_classes, width=4, se_ratio=0.0):
  def conv(k, cin, cout):
    return {'w': (k, k, cin, cout), 'gain': (cout,), 'bias': (cout,)}

  widths = [int(w * width) for w in BASE_WIDTHS]
  in_ch = widths[0] // 4                  # 64 at the default width 4
  tree = {f'{TOP}/~/initial_conv': conv(7, 3, in_ch)}
  i = 0
  for depth, out_ch, stage_stride in zip(depths, widths, STRIDES):
    for b in range(depth):
      n, mid = f'{TOP}/~/' + block_name('nf_res_block', i), out_ch // 4
      tree[n] = {'skip_gain': ()}
      tree[n + '/~/conv0'] = conv(1, in_ch, mid)
      tree[n + '/~/conv1'] = conv(3, mid, mid)
      tree[n + '/~/conv2'] = conv(1, mid, out_ch)
      if (b == 0 and stage_stride > 1) or in_ch != out_ch:
        tree[n + '/~/conv_shortcut'] = conv(1, in_ch, out_ch)
      if se_ratio:
        h = int(out_ch * se_ratio)
        tree[n + '/~/squeeze_excite/~/linear'] = {'w': (out_ch, h), 'b': (h,)}
        tree[n + '/~/squeeze_excite/~/linear_1'] = {'w': (h, out_ch), 'b': (out_ch,)}
      in_ch, i = out_ch, i + 1
  tree[f'{TOP}/~/linear'] = {'w': (in_ch, num_classes), 'b': (num_classes,)}
  return tree


# ---------------------------------------------------------------------------
# Variants, constructor, inputs.
# ---------------------------------------------------------------------------
def test_variant_table_matches_spec():
  assert {v: p['depth'] for v, p in nf_resnet.NF_RESNET_VARIANTS.items()} == SPEC_DEPTHS


def test_unknown_variant_lists_valid_ones():
  with pytest.raises(ValueError) as err:
    traced_shapes(lambda: nf_resnet.NFResNet(10, 'ResNet18'))
  msg = str(err.value)
  assert 'ResNet18' in msg and all(v in msg for v in SPEC_DEPTHS)
  with pytest.raises(ValueError, match='ResNet50'):
    nf_resnet.block_specs('resnet50')


def test_bad_inputs_raise():
  f = hk.transform(lambda x: nf_resnet.NFResNet(10, width=0.25)(x, False))
  with pytest.raises(ValueError, match='rank 4'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))
  with pytest.raises(TypeError, match='uint8'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))


# ---------------------------------------------------------------------------
# Parameter trees and counts.
# ---------------------------------------------------------------------------
def test_resnet50_has_25_557_048_params():
  got = traced_shapes(lambda: nf_resnet.NFResNet(1000))
  assert got == expected_tree(SPEC_DEPTHS['ResNet50'], 1000)
  # A BatchNorm ResNet-50 has 25,557,032 (each WS conv's gain and bias replace a
  # BN's scale and offset); NF adds one skip_gain per block.
  assert count(got) == 25_557_048 == 25_557_032 + 16
  # Spot checks typed from the spec's prose.
  assert got[f'{TOP}/~/initial_conv']['w'] == (7, 7, 3, 64)
  assert got[f'{TOP}/~/linear']['w'] == (2048, 1000)
  assert f'{TOP}/~/nf_res_block_0' not in got
  assert not any('squeeze_excite' in m or 'final_conv' in m for m in got)
  with_shortcut = [i for i in range(16)
                   if f'{TOP}/~/{block_name("nf_res_block", i)}/~/conv_shortcut' in got]
  assert with_shortcut == [0, 3, 7, 13]


def test_optional_squeeze_excite():
  # The released API: use_se switches it on, se_ratio (default 0.25) sizes it.
  got = traced_shapes(lambda: nf_resnet.NFResNet(1000, use_se=True))
  assert got == expected_tree(SPEC_DEPTHS['ResNet50'], 1000, se_ratio=0.25)
  assert got[f'{TOP}/~/nf_res_block_15/~/squeeze_excite/~/linear']['w'] == (2048, 512)
  assert count(got) == nf_resnet.count_flops('ResNet50', use_se=True).params
  half = traced_shapes(lambda: nf_resnet.NFResNet(1000, use_se=True, se_ratio=0.5))
  assert half == expected_tree(SPEC_DEPTHS['ResNet50'], 1000, se_ratio=0.5)
  # se_ratio alone does not switch SE on (it is only the size, as released).
  assert traced_shapes(lambda: nf_resnet.NFResNet(1000, se_ratio=0.5)) == \
      expected_tree(SPEC_DEPTHS['ResNet50'], 1000)


@pytest.mark.parametrize('variant', sorted(SPEC_DEPTHS))
def test_every_variant_builds_with_defaults(variant):
  got = traced_shapes(lambda: nf_resnet.NFResNet(1000, variant))
  assert got == expected_tree(SPEC_DEPTHS[variant], 1000)
  assert count(got) == nf_resnet.count_flops(variant).params


def test_resnet50_macs_match_the_spec_table():
  # Spec table: ResNet-50 4.10 GMACs at 224 (the strided 3x3, "v1.5", layout).
  assert round(nf_resnet.count_flops('ResNet50', 224).macs / 1e9, 2) == 4.09


# ---------------------------------------------------------------------------
# Betas and stochastic depth rates.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['ResNet50', 'ResNet288'])
@pytest.mark.parametrize('alpha', [0.2, 0.5])
def test_betas_follow_recurrence(variant, alpha):
  _, specs = nf_resnet.block_specs(variant, alpha=alpha)
  want = recurrence_betas(SPEC_DEPTHS[variant], alpha)
  np.testing.assert_allclose([s.beta for s in specs], want, rtol=1e-12)
  n = len(specs)
  np.testing.assert_allclose([s.stochdepth_rate for s in specs],
                             [0.1 * i / n for i in range(n)], rtol=1e-12)


def test_model_blocks_carry_the_betas():
  seen = []

  def fn(x):
    model = nf_resnet.NFResNet(10, alpha=0.5, stochdepth_rate=0.3, width=0.25)
    seen.extend((b.beta, b.stochdepth_rate) for b in model.blocks)
    return model(x, False)

  with layers.conv_impl('native'):
    jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  np.testing.assert_allclose([b for b, _ in seen],
                             recurrence_betas(SPEC_DEPTHS['ResNet50'], 0.5), rtol=1e-12)
  np.testing.assert_allclose([r for _, r in seen], [0.3 * i / 16 for i in range(16)])


# ---------------------------------------------------------------------------
# The block, against NumPy.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('stride,in_ch,se_ratio', [(2, 8, 0.25), (1, 8, 0.0), (1, 16, 0.0)])
def test_block_formula(stride, in_ch, se_ratio):
  """out = act(x) * beta; shortcut = strided 1x1 conv of that (no avg-pool) when
  projecting, else x; conv0 -> act -> conv1 (strided) -> act -> conv2; SE;
  return branch * skip_gain * alpha + shortcut."""
  out_ch, mid, beta, alpha = 16, 4, 0.8, 0.3
  f = hk.without_apply_rng(hk.transform(lambda x: nf_resnet.NFResBlock(
      in_ch, out_ch, mid, stride=stride, beta=beta, alpha=alpha, use_se=bool(se_ratio),
      se_ratio=se_ratio or 0.25)(
          x, False)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 6, 6, in_ch)), jnp.float32)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  params = random_params(shapes, rng)
  y, branch = jax.jit(f.apply)(params, x)

  p = {m.split('/~/', 1)[1] if '/~/' in m else 'self': v for m, v in params.items()}
  act = lambda v: np.maximum(v, 0) * RELU_GAMMA
  x64 = np.asarray(x, np.float64)
  out = act(x64) * beta
  projects = stride > 1 or in_ch != out_ch
  assert ('conv_shortcut' in p) == projects
  shortcut = np_conv(out, p['conv_shortcut'], stride) if projects else x64
  h = np_conv(out, p['conv0'])
  h = np_conv(act(h), p['conv1'], stride)
  h = np_conv(act(h), p['conv2'])
  if se_ratio:
    h = 2 * np_se(h, p['squeeze_excite/~/linear'], p['squeeze_excite/~/linear_1']) * h
  np.testing.assert_allclose(branch, h, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y, h * 0.7 * alpha + shortcut, rtol=1e-4, atol=1e-4)


def test_block_skipinit_and_stochastic_depth():
  """skip_gain inits to 0 (or skipinit_gain); in training each example's branch
  is kept whole (unscaled) or dropped whole; not in training, never dropped."""
  rate, batch = 0.5, 64

  def fn(x, is_training, gain_init=jnp.zeros):
    return nf_resnet.NFResBlock(16, 16, 4, stochdepth_rate=rate,
                                   skipinit_gain=gain_init)(x, is_training)

  f = hk.transform(fn)
  x = jnp.asarray(np.tile(np.random.default_rng(0).standard_normal((1, 4, 4, 16)),
                          (batch, 1, 1, 1)), jnp.float32)
  params = f.init(jax.random.PRNGKey(0), x, True)
  assert float(params['nf_res_block']['skip_gain']) == 0.0
  params_one = f.init(jax.random.PRNGKey(0), x, True, jnp.ones)
  assert float(params_one['nf_res_block']['skip_gain']) == 1.0
  apply = jax.jit(f.apply, static_argnums=3)
  y_eval, _ = apply(params_one, jax.random.PRNGKey(1), x, False)
  y_eval2, _ = apply(params_one, jax.random.PRNGKey(2), x, False)
  np.testing.assert_array_equal(y_eval, y_eval2)
  y, branch = apply(params_one, jax.random.PRNGKey(1), x, True)
  y, y_eval, x64 = (np.asarray(a, np.float64) for a in (y, y_eval, x))
  assert np.abs(y_eval - x64).max() > 1e-2
  kept = np.all(np.isclose(y, y_eval, rtol=1e-5, atol=1e-6), axis=(1, 2, 3))
  dropped = np.all(y == x64, axis=(1, 2, 3))
  assert np.all(kept ^ dropped)
  assert np.all(np.asarray(branch)[dropped] == 0)
  assert 0.2 < dropped.mean() < 0.8


# ---------------------------------------------------------------------------
# The whole network, narrow, on 32 px.
# ---------------------------------------------------------------------------
def test_forward_narrow():
  """width 0.25: stem 4, stages 16/32/64/128 channels. Random parameters, every
  branch switched on (skip_gain 1); total stride 32, so 32 px ends at 1 x 1."""
  batch, classes = 4, 10
  sizes = {}

  def fn(x):
    def capture(method, args, kwargs, context):
      out = method(*args, **kwargs)
      if (isinstance(context.module, nf_resnet.NFResBlock)
          and context.method_name == '__call__'):
        sizes[context.module.module_name] = out[0].shape
      return out

    with hk.intercept_methods(capture):
      return nf_resnet.NFResNet(classes, width=0.25)(x, False, return_metrics=True)

  f = hk.transform(fn)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 32, 32, 3)), jnp.float32)
  with layers.conv_impl('native'):
    shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
    params = random_params(shapes, np.random.default_rng(1), skip_gain=1.0)
    out = compile_lowered(f.apply, params, None, x)(params, None, x)
  assert out['logits'].shape == (batch, classes)
  assert out['pool'].shape == (batch, 128)
  assert np.all(np.isfinite(out['logits'])) and np.abs(out['logits']).max() > 0
  assert sorted(k for k in out if k.startswith('block_')) == sorted(
      f'block_{i}' for i in range(16))
  for i in range(16):
    assert set(out[f'block_{i}']) == {'avg_sq_mean', 'avg_var', 'res_avg_var'}
    assert all(np.isfinite(v) for v in out[f'block_{i}'].values())
  got = [sizes[f'{TOP}/~/' + block_name('nf_res_block', i)][1:] for i in range(16)]
  want = [(8, 8, 16)] * 3 + [(4, 4, 32)] * 4 + [(2, 2, 64)] * 6 + [(1, 1, 128)] * 3
  assert got == want


@pytest.mark.parametrize('drop_rate,want', [(None, 0.0), (0.5, 0.5)])
def test_head_dropout_only_in_training(drop_rate, want):
  """pool = mean(act(out)); dropout (training only) -> linear. Blocks are
  intercepted as identities, so only the stem and the head run."""
  def skip_blocks(method, args, kwargs, context):
    if (isinstance(context.module, nf_resnet.NFResBlock)
        and context.method_name == '__call__'):
      return args[0], args[0]
    return method(*args, **kwargs)

  def fn(x, is_training):
    seen = {}

    def capture(method, args, kwargs, context):
      if (context.method_name == '__call__'
          and context.module.module_name == f'{TOP}/~/linear'):
        seen['fc_in'] = args[0]
      return method(*args, **kwargs)

    with hk.intercept_methods(skip_blocks), hk.intercept_methods(capture):
      out = nf_resnet.NFResNet(10, width=1, drop_rate=drop_rate)(x, is_training)
    return out, seen['fc_in']

  f = hk.transform(fn)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 8, 8, 3)), jnp.float32)
  params = f.init(jax.random.PRNGKey(0), x, True)
  (out, fc_in) = f.apply(params, jax.random.PRNGKey(3), x, True)
  pool, fc_in = np.asarray(out['pool']), np.asarray(fc_in)
  assert pool.shape == (8, 16) and np.all(pool >= 0)     # scaled ReLU before the mean
  if want:
    kept = fc_in != 0
    np.testing.assert_allclose(fc_in[kept], pool[kept] / (1 - want), rtol=1e-6)
    assert 0.2 < 1 - kept.mean() < 0.8
  else:
    np.testing.assert_array_equal(fc_in, pool)
  (out, fc_in) = f.apply(params, None, x, False)
  np.testing.assert_array_equal(fc_in, out['pool'])
