"""Tests for nfnet_jax.nfnet against the spec (shared/reference/nfnet-spec.md, section 1).

Expected structures, shapes, betas and counts are derived here from the spec's
text and tables. Forward-pass checks compare the model's intermediate values
(captured with haiku method interceptors) with NumPy re-computations of the
block formula. Networks are narrow and small, compiled once per module, at
XLA backend optimisation level 0 (compile time dominates on a 2-core CPU).
"""
import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import layers, nfnet

# ---------------------------------------------------------------------------
# The spec's tables, typed in from the spec.
# ---------------------------------------------------------------------------
SPEC_DEPTHS = {
    'F0': [1, 2, 6, 3], 'F1': [2, 4, 12, 6], 'F2': [3, 6, 18, 9], 'F3': [4, 8, 24, 12],
    'F4': [5, 10, 30, 15], 'F5': [6, 12, 36, 18], 'F6': [7, 14, 42, 21],
    'F7': [8, 16, 48, 24],
}
SPEC_SIZES = {  # train size, test size, RandAugment magnitude, dropout
    'F0': (192, 256, 5, 0.2), 'F1': (224, 320, 10, 0.3), 'F2': (256, 352, 10, 0.4),
    'F3': (320, 416, 15, 0.4), 'F4': (384, 512, 15, 0.5), 'F5': (416, 544, 15, 0.5),
    'F6': (448, 576, 15, 0.5), 'F7': (480, 608, 15, 0.5),
}
WIDTHS = [256, 512, 1536, 1536]
PLUS_WIDTHS = [384, 768, 2048, 2048]
STRIDES = [1, 2, 2, 2]
SPEC_PARAMS_M = {
    'F0': 71.49, 'F1': 132.63, 'F2': 193.78, 'F3': 254.92, 'F4': 316.07, 'F5': 377.21,
    'F6': 438.36, 'F7': 499.50,
    'F0+': 118.82, 'F1+': 220.36, 'F2+': 321.89, 'F3+': 423.42, 'F4+': 524.95,
    'F5+': 626.49, 'F6+': 728.02, 'F7+': 829.55,
}
F0_BETAS = [1.0, .9806, .9806, .9623, .9806, .9623, .9449, .9285, .9129, .8980,
            .9806, .9623]
GELU_GAMMA = 1.7015043497085571
ALPHA = 0.2


def np_act(x):
  """Scaled GELU (tanh approximation, as jax.nn.gelu's default), float64."""
  x = np.asarray(x, np.float64)
  return GELU_GAMMA * 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def recurrence_betas(depths, alpha=ALPHA):
  """The spec's bookkeeping: beta = 1/expected_std; expected_std starts at 1, is
  reset to 1 after the first block of each stage, else grows by alpha^2 in variance."""
  betas, expected_std = [], 1.0
  for depth in depths:
    for i in range(depth):
      betas.append(1.0 / expected_std)
      if i == 0:
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
  return betas


def spec_blocks(depths, widths, width=1.0, group_size=128):
  """Per block (in, out, stride, bottleneck, groups, projection?), from the spec."""
  widths = [int(w * width) for w in widths]
  in_ch, blocks = widths[0] // 2, []
  for depth, out_ch, stage_stride in zip(depths, widths, STRIDES):
    for i in range(depth):
      stride = stage_stride if i == 0 else 1
      groups = int(out_ch * 0.5) // group_size
      assert groups >= 1, 'test configs keep whole groups'
      blocks.append(dict(in_ch=in_ch, out_ch=out_ch, stride=stride, mid=groups * group_size,
                         groups=groups, proj=stride > 1 or in_ch != out_ch))
      in_ch = out_ch
  return blocks


def block_name(i):
  return 'NFNet/~/nf_block' + ('' if i == 0 else f'_{i}')


def expected_param_shapes(depths, widths, num_classes, width=1.0, group_size=128):
  """{module path: {param: shape}} for an NFNet, built from the spec's text."""
  blocks = spec_blocks(depths, widths, width, group_size)
  stem_ch = int(widths[0] * width) // 2

  def conv(k, cin, cout):
    return {'w': (k, k, cin, cout), 'gain': (cout,), 'bias': (cout,)}

  tree = {}
  for i, (cin, cout) in enumerate([(3, 16), (16, 32), (32, 64), (64, stem_ch)]):
    tree[f'NFNet/~/stem_conv{i}'] = conv(3, cin, cout)
  for i, b in enumerate(blocks):
    n, mid, g = block_name(i), b['mid'], b['groups']
    tree[n] = {'skip_gain': ()}
    tree[n + '/~/conv0'] = conv(1, b['in_ch'], mid)
    tree[n + '/~/conv1'] = conv(3, mid // g, mid)
    tree[n + '/~/conv1b'] = conv(3, mid // g, mid)
    tree[n + '/~/conv2'] = conv(1, mid, b['out_ch'])
    if b['proj']:
      tree[n + '/~/conv_shortcut'] = conv(1, b['in_ch'], b['out_ch'])
    hidden = max(1, int(b['out_ch'] * 0.5))
    tree[n + '/~/squeeze_excite/~/linear'] = {'w': (b['out_ch'], hidden), 'b': (hidden,)}
    tree[n + '/~/squeeze_excite/~/linear_1'] = {'w': (hidden, b['out_ch']),
                                               'b': (b['out_ch'],)}
  last = blocks[-1]['out_ch']
  tree['NFNet/~/final_conv'] = conv(1, last, 2 * last)
  tree['NFNet/~/linear'] = {'w': (2 * last, num_classes), 'b': (num_classes,)}
  return tree


def _forward(num_classes=1000, variant='F0', **kw):
  def fn(x, is_training=False, return_metrics=False):
    return nfnet.NFNet(num_classes, variant, **kw)(x, is_training,
                                                   return_metrics=return_metrics)
  return hk.transform(fn)


@functools.lru_cache(maxsize=None)
def _param_shapes(variant, num_classes, image_size, kw_items):
  kw = dict(kw_items)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  tree = jax.eval_shape(_forward(num_classes, variant, **kw).init, jax.random.PRNGKey(0), x)
  return {m: {k: tuple(v.shape) for k, v in p.items()} for m, p in tree.items()}


def param_shapes(variant='F0', num_classes=1000, image_size=32, **kw):
  """{module: {param: shape}} of the real model, via jax.eval_shape (cached)."""
  shapes = _param_shapes(variant, num_classes, image_size, tuple(sorted(kw.items())))
  return {m: dict(p) for m, p in shapes.items()}


def count(shapes):
  return sum(int(np.prod(s)) for p in shapes.values() for s in p.values())


def _compile(fn, *args):
  """jit at XLA backend optimisation level 0: same function, faster compile."""
  return jax.jit(fn).lower(*args).compile(
      compiler_options={'xla_backend_optimization_level': 0})


def np_params(shapes, rng, fc_std=0.01):
  """Parameters shaped like the model's, filled as the spec's init (NumPy RNG).

  Conv `w` N(0, 1/fan_in), gain 1, bias 0, skip_gain 0 (SkipInit), SE linears
  N(0, 1/fan_in) with zero biases, classifier N(0, fc_std^2).
  """
  params = {}
  for mod, p in shapes.items():
    params[mod] = {}
    for name, shape in p.items():
      if name == 'w' and mod == 'NFNet/~/linear':
        v = rng.standard_normal(shape) * fc_std
      elif name == 'w':
        v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
      elif name == 'gain':
        v = np.ones(shape)
      else:   # bias, b, skip_gain
        v = np.zeros(shape)
      params[mod][name] = jnp.asarray(v, jnp.float32)
  return params


# ---------------------------------------------------------------------------
# Variants table and constructor.
# ---------------------------------------------------------------------------
def test_variant_table_matches_spec():
  assert set(nfnet.NFNET_VARIANTS) == set(SPEC_PARAMS_M)
  for k in range(8):
    train, test, mag, drop = SPEC_SIZES[f'F{k}']
    for suffix, widths in (('', WIDTHS), ('+', PLUS_WIDTHS)):
      v = nfnet.NFNET_VARIANTS[f'F{k}{suffix}']
      assert list(v['width']) == widths
      assert list(v['depth']) == SPEC_DEPTHS[f'F{k}']
      assert (v['train_imsize'], v['test_imsize']) == (train, test)
      assert (v['randaug_layers'], v['randaug_magnitude']) == (4, mag)
      assert v['drop_rate'] == drop


def test_unknown_variant_lists_valid_ones():
  with pytest.raises(ValueError) as err:
    param_shapes('F8')
  msg = str(err.value)
  assert 'F8' in msg and 'F0' in msg and 'F7+' in msg
  with pytest.raises(ValueError, match='F0'):
    nfnet.block_specs('f0')


def test_rank3_input_raises():
  f = _forward(10, width=0.125, group_size=16)
  with pytest.raises(ValueError, match='rank 4'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))


def test_uint8_input_raises():
  f = _forward(10, width=0.125, group_size=16)
  with pytest.raises(TypeError, match='uint8'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))


# ---------------------------------------------------------------------------
# Parameter tree and counts.
# ---------------------------------------------------------------------------
def test_f0_param_tree_names_and_shapes():
  got = param_shapes('F0', 1000)
  want = expected_param_shapes(SPEC_DEPTHS['F0'], WIDTHS, 1000)
  assert sorted(got) == sorted(want)
  for mod in want:
    assert got[mod] == want[mod], mod
  # Spot checks typed straight from the spec's prose.
  assert 'NFNet/~/nf_block_0' not in got
  assert got['NFNet/~/linear']['w'] == (3072, 1000)
  assert got['NFNet/~/final_conv']['w'] == (1, 1, 1536, 3072)
  assert got['NFNet/~/stem_conv3']['w'] == (3, 3, 64, 128)
  assert got['NFNet/~/nf_block_3/~/conv1']['w'] == (3, 3, 128, 768)   # 6 groups of 128
  assert got['NFNet/~/nf_block']['skip_gain'] == ()


def test_f0_projection_blocks():
  # Projection only where stride > 1 or channels change: the first block of each
  # stage (block 0: 128 stem channels -> 256).
  got = param_shapes('F0', 1000)
  with_shortcut = [i for i in range(12) if block_name(i) + '/~/conv_shortcut' in got]
  assert with_shortcut == [0, 1, 3, 9]


def test_f0_has_71_49m_params():
  n = count(param_shapes('F0', 1000))
  assert round(n / 1e6, 2) == 71.49


def _zeros_creator(next_creator, shape, dtype, init, context):
  return next_creator(shape, dtype, jnp.zeros)


def fast_param_count(variant):
  """Parameter count of the real model at 1000 classes, via jax.eval_shape (never
  materialised). Tracing only: the initializers are swapped for zeros and the
  native conv lowering used, which leaves every shape unchanged but halves the
  tracing time of the deep variants."""
  def fn(x):
    with hk.custom_creator(_zeros_creator):
      return nfnet.NFNet(1000, variant)(x, False)
  with layers.conv_impl('native'):
    tree = jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('plus', ['', '+'])
def test_param_counts_match_spec_table(plus):
  """All 16 variants. F0, F1 and F7 (and their '+') are traced; depths grow as
  (k + 1) x F0's (checked against the spec in test_variant_table_matches_spec),
  so every count is affine in k: F2..F6 are P(F0) + k (P(F1) - P(F0)), and the
  traced F7 checks that this holds exactly."""
  p0, p1, p7 = (fast_param_count(f'F{k}{plus}') for k in (0, 1, 7))
  assert p7 == p0 + 7 * (p1 - p0)
  for k in range(8):
    n = p0 + k * (p1 - p0)
    assert round(n / 1e6, 2) == SPEC_PARAMS_M[f'F{k}{plus}'], f'F{k}{plus}: {n}'


def test_narrow_param_tree_follows_spec():
  got = param_shapes('F0', 10, width=0.125, group_size=16)
  want = expected_param_shapes(SPEC_DEPTHS['F0'], WIDTHS, 10, width=0.125, group_size=16)
  assert got == want


def test_plus_variant_stem_and_final_conv():
  got = param_shapes('F0+', 1000)
  assert got['NFNet/~/stem_conv3']['w'] == (3, 3, 64, 192)
  assert got['NFNet/~/final_conv']['w'] == (1, 1, 2048, 4096)
  assert got['NFNet/~/linear']['w'] == (4096, 1000)
  assert got == expected_param_shapes(SPEC_DEPTHS['F0'], PLUS_WIDTHS, 1000)


# ---------------------------------------------------------------------------
# Betas and stochastic depth rates.
# ---------------------------------------------------------------------------
def test_recurrence_reproduces_spec_f0_betas():
  np.testing.assert_allclose(recurrence_betas(SPEC_DEPTHS['F0']), F0_BETAS, atol=5e-5)


def test_f0_betas_match_spec_list():
  _, specs = nfnet.block_specs('F0')
  np.testing.assert_allclose([s.beta for s in specs], F0_BETAS, atol=5e-5)


@pytest.mark.parametrize('variant', ['F0', 'F3', 'F7+'])
@pytest.mark.parametrize('alpha', [0.2, 0.5])
def test_betas_match_recurrence(variant, alpha):
  _, specs = nfnet.block_specs(variant, alpha=alpha)
  want = recurrence_betas(SPEC_DEPTHS[variant.rstrip('+')], alpha)
  np.testing.assert_allclose([s.beta for s in specs], want, rtol=1e-12)


@pytest.mark.parametrize('rate', [0.1, 0.25])
def test_stochdepth_rates(rate):
  _, specs = nfnet.block_specs('F0', stochdepth_rate=rate)
  np.testing.assert_allclose([s.stochdepth_rate for s in specs],
                             [rate * i / 12 for i in range(12)], rtol=1e-12, atol=0)


def test_block_specs_shapes_follow_spec():
  for variant, widths in (('F1', WIDTHS), ('F0+', PLUS_WIDTHS)):
    stem, specs = nfnet.block_specs(variant)
    want = spec_blocks(SPEC_DEPTHS[variant.rstrip('+')], widths)
    assert stem == widths[0] // 2
    got = [dict(in_ch=s.in_ch, out_ch=s.out_ch, stride=s.stride, mid=s.bottleneck_ch,
                groups=s.groups, proj=s.stride > 1 or s.in_ch != s.out_ch) for s in specs]
    assert got == want


# ---------------------------------------------------------------------------
# Forward pass: one narrow F0, compiled once, intermediates captured.
# ---------------------------------------------------------------------------
NARROW = dict(width=0.25, group_size=32)          # stages 64, 128, 384, 384 channels
NARROW_BLOCKS = spec_blocks(SPEC_DEPTHS['F0'], WIDTHS, **NARROW)
BATCH, SIZE, CLASSES = 16, 64, 10


def _captured_forward(**kw):
  """NFNet forward (eval) that also returns each module's call input and output."""
  def fn(x):
    caps = {}

    def interceptor(method, args, kwargs, context):
      out = method(*args, **kwargs)
      if context.method_name == '__call__' and context.module.module_name != 'NFNet':
        caps[context.module.module_name] = (args[0], out)
      return out

    with hk.intercept_methods(interceptor):
      out = nfnet.NFNet(CLASSES, 'F0', **kw)(x, False, return_metrics=True)
    return out, caps
  return hk.without_apply_rng(hk.transform(fn))


def with_skip_gain(params, value):
  return {m: ({**p, 'skip_gain': jnp.float32(value)} if 'skip_gain' in p else p)
          for m, p in params.items()}


@pytest.fixture(scope='module')
def narrow_run():
  """A narrow F0 on N(0, 1) images, at init and with skip_gain set to 0.7 and 1.

  Returns the init params and, per setting, (outputs, captured module I/O).
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((BATCH, SIZE, SIZE, 3)), jnp.float32)
  f = _captured_forward(**NARROW)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  shapes = {m: {k: v.shape for k, v in p.items()} for m, p in shapes.items()}
  params = np_params(shapes, rng)
  apply = _compile(f.apply, params, x)
  return dict(params=params, out=apply(params, x),
              out_gained=apply(with_skip_gain(params, 0.7), x),
              out_on=apply(with_skip_gain(params, 1.0), x))


def _np(a):
  return np.asarray(a, np.float64)


def _close(got, want, rtol=2e-4):
  got, want = _np(got), _np(want)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_output_dict_and_shapes(narrow_run):
  out, caps = narrow_run['out']
  assert out['logits'].shape == (BATCH, CLASSES)
  assert out['pool'].shape == (BATCH, 2 * 384)
  assert sorted(k for k in out if k.startswith('block_')) == sorted(
      f'block_{i}' for i in range(12))


def test_total_stride_32(narrow_run):
  _, caps = narrow_run['out']
  assert caps['NFNet/~/stem_conv0'][1].shape[1:3] == (32, 32)
  assert caps['NFNet/~/stem_conv3'][1].shape == (BATCH, 16, 16, 32)   # stem stride 4
  sizes = [caps[block_name(i)][1][0].shape[1] for i in range(12)]
  assert sizes == [16] + [8] * 2 + [4] * 6 + [2] * 3
  assert caps['NFNet/~/final_conv'][0].shape == (BATCH, 2, 2, 384)    # 64 / 32 = 2


def test_total_stride_odd_size():
  # SAME padding rounds up at every stride: 40 -> 20 -> 20 -> 20 -> 10 (stem),
  # then 10, 5, 3, 2 after the stages.
  seen = {}

  def fn(x):
    def interceptor(method, args, kwargs, context):
      out = method(*args, **kwargs)
      seen[context.module.module_name] = out
      return out
    with hk.intercept_methods(interceptor):
      return nfnet.NFNet(10, 'F0', width=0.125, group_size=16)(x, False)

  x = jax.ShapeDtypeStruct((2, 40, 40, 3), jnp.float32)
  out = jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0), x)
  assert seen['NFNet/~/stem_conv3'].shape[1:3] == (10, 10)
  assert [seen[block_name(i)][0].shape[1] for i in (0, 1, 3, 9)] == [10, 5, 3, 2]
  assert seen['NFNet/~/final_conv'].shape == (2, 2, 2, 2 * 192)
  assert out['NFNet/~/linear']['w'].shape == (2 * 192, 10)


def test_stem_activations(narrow_run):
  _, caps = narrow_run['out']
  for i in range(3):   # act after stem_conv0..2
    _close(caps[f'NFNet/~/stem_conv{i + 1}'][0], np_act(caps[f'NFNet/~/stem_conv{i}'][1]))
  # No activation after stem_conv3: the first block gets its raw output.
  np.testing.assert_array_equal(caps[block_name(0)][0], caps['NFNet/~/stem_conv3'][1])


def test_blocks_apply_spec_betas(narrow_run):
  """conv0's input is act(x) * beta, with beta from the spec's recurrence."""
  _, caps = narrow_run['out']
  betas = recurrence_betas(SPEC_DEPTHS['F0'])
  for i in range(12):
    x_in = caps[block_name(i)][0]
    conv0_in = caps[block_name(i) + '/~/conv0'][0]
    got_beta = float(np.sum(_np(conv0_in) * np_act(x_in)) / np.sum(np_act(x_in) ** 2))
    assert got_beta == pytest.approx(betas[i], rel=1e-5), f'block {i}'
    _close(conv0_in, np_act(x_in) * betas[i])


@pytest.mark.parametrize('key', ['out', 'out_gained'])
def test_block_formula(narrow_run, key):
  """out = act(x)*beta -> conv0 -> act -> conv1 -> act -> conv1b -> act -> conv2;
  out = 2 * se(out) * out * skip_gain * alpha + shortcut."""
  _, caps = narrow_run[key]
  skip_gain = 0.7 if key == 'out_gained' else 0.0
  for i, b in enumerate(NARROW_BLOCKS):
    n = block_name(i)
    x_in, (y, branch) = caps[n]
    c = {k: caps[f'{n}/~/{k}'] for k in ('conv0', 'conv1', 'conv1b', 'conv2')}
    _close(c['conv1'][0], np_act(c['conv0'][1]))
    _close(c['conv1b'][0], np_act(c['conv1'][1]))
    _close(c['conv2'][0], np_act(c['conv1b'][1]))
    se_in, gate = caps[n + '/~/squeeze_excite']
    np.testing.assert_array_equal(se_in, c['conv2'][1])
    conv0_in = _np(c['conv0'][0])
    if b['stride'] > 1:
      # 2x2 average pool, stride 2 (sizes here are even, so SAME == VALID).
      pooled = conv0_in.reshape(BATCH, conv0_in.shape[1] // 2, 2, conv0_in.shape[2] // 2, 2,
                                -1).mean(axis=(2, 4))
      _close(caps[n + '/~/conv_shortcut'][0], pooled)
      shortcut = caps[n + '/~/conv_shortcut'][1]
    elif b['proj']:
      _close(caps[n + '/~/conv_shortcut'][0], conv0_in)
      shortcut = caps[n + '/~/conv_shortcut'][1]
    else:
      assert n + '/~/conv_shortcut' not in caps
      shortcut = x_in
    want = _np(gate) * 2 * _np(c['conv2'][1]) * skip_gain * ALPHA + _np(shortcut)
    _close(y, want)
    if skip_gain == 0 and not b['proj']:
      np.testing.assert_array_equal(y, x_in)   # SkipInit: identity at init


def test_head(narrow_run):
  out, caps = narrow_run['out']
  params = narrow_run['params']
  np.testing.assert_array_equal(caps['NFNet/~/final_conv'][0], caps[block_name(11)][1][0])
  pool = np_act(caps['NFNet/~/final_conv'][1]).mean(axis=(1, 2))
  _close(out['pool'], pool)
  fc = params['NFNet/~/linear']
  _close(out['logits'], _np(out['pool']) @ _np(fc['w']) + _np(fc['b']))


# ---------------------------------------------------------------------------
# Signal propagation at initialisation (2101.08692, "signal propagation plots").
# ---------------------------------------------------------------------------
def _stats(out, name):
  return np.array([float(out[f'block_{i}'][name]) for i in range(12)])


def _stage_of_block():
  return np.repeat(np.arange(4), SPEC_DEPTHS['F0'])


def test_signal_propagation_at_init(narrow_run):
  out, _ = narrow_run['out']
  avg_var, res_var = _stats(out, 'avg_var'), _stats(out, 'res_avg_var')
  sq_mean = _stats(out, 'avg_sq_mean')
  assert np.all(np.isfinite(avg_var)) and np.all(res_var > 0)
  # Gamma-scaled activations and scaled WS convs preserve variance; the only
  # systematic loss is the 2x2 average pool on each transition's shortcut,
  # which on spatially white N(0, 1) inputs averages 4 nearly independent values
  # (variance / 4; natural images are smooth and lose far less). Undoing that
  # factor, every block's output variance must stay of unit order.
  normalised = avg_var * 4.0 ** _stage_of_block()
  assert np.all((normalised > 0.3) & (normalised < 3)), normalised
  # Scaled WS removes the mean shift: channel means stay near 0.
  assert np.all(sq_mean < 0.1), sq_mean
  # skip_gain = 0: identity blocks pass their input through unchanged.
  for i, b in enumerate(NARROW_BLOCKS):
    if not b['proj']:
      assert avg_var[i] == avg_var[i - 1]


def test_signal_variance_grows_with_expected_std(narrow_run):
  """skip_gain = 1: each non-transition block adds alpha^2 * Var(branch) to the
  variance (x + alpha * r, branch nearly uncorrelated with x): the bookkeeping
  behind expected_std^2 += alpha^2."""
  out, _ = narrow_run['out_on']
  avg_var, res_var = _stats(out, 'avg_var'), _stats(out, 'res_avg_var')
  normalised = avg_var * 4.0 ** _stage_of_block()
  assert np.all((normalised > 0.3) & (normalised < 3)), normalised
  starts = np.cumsum([0] + SPEC_DEPTHS['F0'][:-1])
  for start, depth in zip(starts, SPEC_DEPTHS['F0']):
    for i in range(start + 1, start + depth):
      increment = avg_var[i] - avg_var[i - 1]
      predicted = ALPHA**2 * res_var[i]
      # A band of 3x each way leaves room for the (small) cross term.
      assert 0.3 * predicted < increment < 3 * predicted, (i, increment, predicted)
  # Stage 3 (6 blocks): variance grows monotonically across the stage, and it
  # grows by much less than it would without alpha (alpha^2 = 0.04 per block).
  stage3 = avg_var[3:9]
  assert np.all(np.diff(stage3) > 0)
  assert stage3[-1] / stage3[0] < 1 + 5 * ALPHA**2 * 3


# ---------------------------------------------------------------------------
# Training mode: stochastic depth and dropout.
# ---------------------------------------------------------------------------
def _skip_blocks(method, args, kwargs, context):
  """Intercept NFBlocks as identities: isolates the head (and compiles fast)."""
  if isinstance(context.module, nfnet.NFBlock) and context.method_name == '__call__':
    return args[0], args[0]
  return method(*args, **kwargs)


def _skip_stem(method, args, kwargs, context):
  if context.method_name == '__call__' and 'stem_conv' in context.module.module_name:
    return args[0]
  return method(*args, **kwargs)


def _head_only(num_classes, variant, skip_stem=False, **kw):
  def fn(x, is_training):
    seen = {}

    def capture(method, args, kwargs, context):
      out = method(*args, **kwargs)
      if context.module.module_name == 'NFNet/~/linear':
        seen['fc_in'] = args[0]
      return out

    with hk.intercept_methods(_skip_blocks), hk.intercept_methods(capture):
      if skip_stem:
        with hk.intercept_methods(_skip_stem):
          out = nfnet.NFNet(num_classes, variant, **kw)(x, is_training)
      else:
        out = nfnet.NFNet(num_classes, variant, **kw)(x, is_training)
    return out, seen['fc_in']
  return hk.transform(fn)


@pytest.mark.parametrize('variant,drop_rate,want', [
    ('F0', None, 0.2), ('F4', None, 0.5), ('F0', 0.0, 0.0), ('F0', 0.35, 0.35)])
def test_classifier_dropout_rate(variant, drop_rate, want):
  # Blocks and stem intercepted: final_conv -> act -> pool -> dropout -> linear.
  f = _head_only(10, variant, skip_stem=True, width=0.125, group_size=16,
                 drop_rate=drop_rate)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4, 4, 3)), jnp.float32)
  shapes = jax.eval_shape(lambda k, x: f.init(k, x, True), jax.random.PRNGKey(0), x)
  params = np_params({m: {k: v.shape for k, v in p.items()} for m, p in shapes.items()},
                     np.random.default_rng(2))
  # Eager (no jit): every case has the same shapes, so XLA's per-op cache is shared.
  (out, fc_in) = f.apply(params, jax.random.key(3, impl='rbg'), x, True)
  pool, fc_in = _np(out['pool']), _np(fc_in)
  kept = fc_in != 0
  if want == 0:
    np.testing.assert_array_equal(fc_in, pool)
  else:
    # Dropout: kept units rescaled by 1 / (1 - rate); the drop fraction ~ rate
    # (8 x 384 units: std of the fraction < 0.01).
    np.testing.assert_allclose(fc_in[kept], pool[kept] / (1 - want), rtol=1e-6)
    assert 1 - kept.mean() == pytest.approx(want, abs=0.05)
  # Not training: no dropout whatever the rate.
  (out, fc_in) = f.apply(params, None, x, False)
  np.testing.assert_array_equal(fc_in, out['pool'])


def test_classifier_init():
  f = _head_only(500, 'F0', width=0.125, group_size=16)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  params = jax.jit(lambda k, x: f.init(k, x, False))(jax.random.key(0, impl='rbg'), x)
  w = np.asarray(params['NFNet/~/linear']['w'])
  assert w.shape == (384, 500)
  assert w.std() == pytest.approx(0.01, rel=0.03)          # 192k samples
  np.testing.assert_array_equal(params['NFNet/~/linear']['b'], 0)
  np.testing.assert_array_equal(params['NFNet/~/final_conv']['gain'], 1)
  np.testing.assert_array_equal(params['NFNet/~/final_conv']['bias'], 0)


def test_block_init_and_stochastic_depth():
  """NFBlock: skip_gain inits to 0; in training each example's branch is kept
  whole (unscaled) or dropped whole."""
  rate, batch = 0.5, 64

  def fn(x, is_training):
    return nfnet.NFBlock(32, 32, 32, 2, stride=1, beta=1.0, stochdepth_rate=rate)(
        x, is_training)

  f = hk.transform(fn)
  # One example repeated: kept examples must all equal the eval output.
  x = jnp.asarray(np.tile(np.random.default_rng(0).standard_normal((1, 6, 6, 32)),
                          (batch, 1, 1, 1)), jnp.float32)
  params = jax.jit(lambda k, x: f.init(k, x, True))(jax.random.key(0, impl='rbg'), x)
  assert float(params['nf_block']['skip_gain']) == 0.0
  params = {**params, 'nf_block': {'skip_gain': jnp.float32(1.0)}}
  apply_eval = jax.jit(lambda p, x: f.apply(p, None, x, False))
  apply_train = jax.jit(lambda p, k, x: f.apply(p, k, x, True))
  y_eval, _ = apply_eval(params, x)
  y, branch = apply_train(params, jax.random.key(1, impl='rbg'), x)
  y, y_eval, x64 = _np(y), _np(y_eval), _np(x)
  assert np.abs(y_eval - x64).max() > 1e-2            # the branch is not negligible
  kept = np.all(np.isclose(y, y_eval, rtol=1e-5, atol=1e-6), axis=(1, 2, 3))
  dropped = np.all(y == x64, axis=(1, 2, 3))
  assert np.all(kept ^ dropped)
  assert np.all(_np(branch)[dropped] == 0)
  assert 0.2 < dropped.mean() < 0.8                   # 64 draws at p = 0.5


# ---------------------------------------------------------------------------
# Conv lowering on a whole narrow network.
# ---------------------------------------------------------------------------
def test_dense_and_native_lowering_agree_on_network(monkeypatch):
  # A test-only variant with F0's widths but depths [1, 2, 1, 1]: every kind of
  # block (channel-change projection, strided projection, identity) and grouped
  # convs of 1, 2 and 6 groups, at 5/12 of F0's compile time.
  monkeypatch.setitem(nfnet.NFNET_VARIANTS, 'T5',
                      {**nfnet.NFNET_VARIANTS['F0'], 'depth': [1, 2, 1, 1]})
  f = hk.without_apply_rng(hk.transform(
      lambda x: nfnet.NFNet(10, 'T5', width=0.125, group_size=16)(x, False)['logits']))
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  params = np_params({m: {k: v.shape for k, v in p.items()} for m, p in shapes.items()},
                     rng, fc_std=0.3)
  # Switch every residual branch on, so the grouped convs shape the output.
  params = {m: ({**p, 'skip_gain': jnp.float32(1.0)} if 'skip_gain' in p else p)
            for m, p in params.items()}
  cot = jnp.asarray(rng.standard_normal((2, 10)), jnp.float32)

  def loss(p, xx):
    logits = f.apply(p, xx)
    return jnp.sum(logits * cot), logits

  results = {}
  for impl in ('native', 'dense'):
    with layers.conv_impl(impl):
      step = _compile(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), params, x)
    (_, logits), (gp, gx) = step(params, x)
    results[impl] = (logits, gp, gx)
  (l_n, gp_n, gx_n), (l_d, gp_d, gx_d) = results['native'], results['dense']
  # float32 sums in a different order: ~1e-6 relative differences, compared
  # with each tensor's largest entry.
  _close(l_d, l_n, rtol=1e-5)
  _close(gx_d, gx_n, rtol=1e-5)
  for mod in gp_n:
    for name in gp_n[mod]:
      _close(gp_d[mod][name], gp_n[mod][name], rtol=1e-5)
