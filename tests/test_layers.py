"""Tests for nfnet_jax.layers against independent references.

Every expected value is computed here from the spec (shared/reference/nfnet-spec.md,
section 1): numerical integration for the activation gammas, float64 NumPy for
weight standardization, an explicit-loop convolution for WSConv2D, a NumPy
squeeze-excite. Nothing is copied from running the code under test.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import integrate, special

from nfnet_jax import layers

FAST = settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**31 - 1)

# ---------------------------------------------------------------------------
# Gamma-scaled activations.
# ---------------------------------------------------------------------------
# The spec's table, typed in from the spec (not from layers.py).
SPEC_GAMMAS = {
    'gelu': 1.7015043497085571, 'relu': 1.7139588594436646,
    'silu': 1.7881293296813965, 'elu': 1.2716004848480225,
    'celu': 1.270926833152771, 'leaky_relu': 1.70590341091156,
    'relu6': 1.7131484746932983, 'selu': 1.0008515119552612,
    'sigmoid': 4.803835391998291, 'softplus': 1.9203323125839233,
    'tanh': 1.5939117670059204, 'soft_sign': 2.338853120803833,
    'log_sigmoid': 1.9193484783172607, 'glu': 1.8484294414520264,
    'log_softmax': 1.0002083778381348, 'identity': 1.0,
}

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _np_gelu_tanh(x):
  # The authors call jax.nn.gelu with its default, the tanh approximation.
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# Elementwise f, written in NumPy from the textbook definitions (JAX defaults:
# leaky_relu slope 0.01, celu alpha 1). Vectorised, so usable both in quad and on
# arrays.
NP_ACTIVATIONS = {
    'gelu': _np_gelu_tanh,
    'relu': lambda x: np.maximum(x, 0.0),
    'silu': lambda x: x * special.expit(x),
    'elu': lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    'celu': lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    'leaky_relu': lambda x: np.where(x > 0, x, 0.01 * x),
    'relu6': lambda x: np.clip(x, 0.0, 6.0),
    'selu': lambda x: _SELU_SCALE * np.where(
        x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0.0))),
    'sigmoid': special.expit,
    'softplus': lambda x: np.logaddexp(0.0, x),
    'tanh': np.tanh,
    'soft_sign': lambda x: x / (1.0 + np.abs(x)),
    'log_sigmoid': lambda x: -np.logaddexp(0.0, -x),
    'identity': lambda x: x,
}


def _normal_pdf(x):
  return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _expect(g):
  """E[g(z)], z ~ N(0, 1), by adaptive quadrature."""
  return integrate.quad(lambda z: float(g(z)) * _normal_pdf(z), -np.inf, np.inf,
                        epsabs=1e-13, epsrel=1e-12, limit=200)[0]


def _integrated_gamma(name):
  if name == 'glu':
    # f(a, b) = a * sigmoid(b), a and b independent N(0, 1). E[f] = E[a] E[s] = 0
    # and E[f^2] = E[a^2] E[s(b)^2] = E[s(b)^2]: the 2-D integral factorises.
    return 1.0 / np.sqrt(_expect(lambda b: special.expit(b) ** 2))
  if name == 'log_softmax':
    # Over n iid normals, log_softmax_i = z_i - logsumexp(z). By Stein's lemma
    # Cov(z_i, LSE) = E[softmax_i] = 1/n and Var(LSE) = O(1/n), so the std is
    # 1 + O(1/n): exactly 1 for the long vectors the constant was sampled on.
    return 1.0
  f = NP_ACTIVATIONS[name]
  m1 = _expect(f)
  m2 = _expect(lambda z: f(z) ** 2)
  return 1.0 / np.sqrt(m2 - m1 * m1)


def test_activation_table_matches_spec():
  # Plus 'swish', the released NF_RegNet's default name for SiLU.
  assert set(layers.ACTIVATION_GAMMAS) == set(SPEC_GAMMAS) | {'swish'}
  for name, gamma in SPEC_GAMMAS.items():
    assert layers.ACTIVATION_GAMMAS[name] == pytest.approx(gamma, rel=1e-7), name


def test_swish_is_scaled_silu():
  x = np.linspace(-6, 6, 101).astype(np.float32)
  want = NP_ACTIVATIONS['silu'](x.astype(np.float64)) * SPEC_GAMMAS['silu']
  np.testing.assert_allclose(layers.scaled_activation('swish')(x), want, rtol=1e-6,
                             atol=1e-6)


GAMMA_RTOL = 1.5e-3


@pytest.mark.parametrize('name', sorted(SPEC_GAMMAS))
def test_gamma_is_inverse_std_by_integration(name):
  # The published gammas were estimated by sampling; against exact integrals they
  # are all within 0.12% (glu is the worst, 1.19e-3; most are ~5e-4; selu's exact
  # value is 1.0, 8.5e-4 below the table). rtol 1.5e-3 accepts that sampling
  # error yet still tells apart the nearest distinct functions: the gelu constant
  # is 1.95e-3 from leaky_relu's exact gamma, 6.5e-3 from relu's, 5% from silu's.
  # (relu/relu6, elu/celu and softplus/log_sigmoid have equal exact gammas: they
  # differ only far in the tail, are the same at alpha=1, or are mirror images.)
  got = layers.ACTIVATION_GAMMAS[name]
  np.testing.assert_allclose(got, _integrated_gamma(name), rtol=GAMMA_RTOL)


def test_gamma_tolerance_can_fail():
  # The tolerance above is tight enough to reject a swapped gamma.
  for a, b in [('gelu', 'relu'), ('gelu', 'leaky_relu'), ('silu', 'gelu'),
               ('softplus', 'soft_sign'), ('elu', 'selu')]:
    assert abs(SPEC_GAMMAS[a] / _integrated_gamma(b) - 1) > GAMMA_RTOL, (a, b)


def test_log_softmax_std_on_long_vector_is_one():
  # A sampled check of the limit argument in _integrated_gamma.
  z = np.random.default_rng(0).standard_normal((8, 4096))
  lsm = z - special.logsumexp(z, axis=-1, keepdims=True)
  assert np.std(lsm) == pytest.approx(1.0, abs=0.01)


@FAST
@given(name=st.sampled_from(sorted(NP_ACTIVATIONS)), seed=seeds,
       scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_scaled_activation_equals_f_times_gamma(name, seed, scale):
  x = (np.random.default_rng(seed).standard_normal((3, 17)) * scale).astype(np.float32)
  got = np.asarray(layers.scaled_activation(name)(jnp.asarray(x)))
  want = NP_ACTIVATIONS[name](x.astype(np.float64)) * SPEC_GAMMAS[name]
  assert got.dtype == np.float32 and got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@FAST
@given(seed=seeds)
def test_scaled_glu_and_log_softmax(seed):
  x = np.random.default_rng(seed).standard_normal((4, 10)).astype(np.float32)
  x64 = x.astype(np.float64)
  got = np.asarray(layers.scaled_activation('glu')(jnp.asarray(x)))
  want = x64[:, :5] * special.expit(x64[:, 5:]) * SPEC_GAMMAS['glu']
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  got = np.asarray(layers.scaled_activation('log_softmax')(jnp.asarray(x)))
  want = (x64 - special.logsumexp(x64, axis=-1, keepdims=True)) * SPEC_GAMMAS['log_softmax']
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('name', sorted(SPEC_GAMMAS))
def test_scaled_activation_keeps_bf16(name):
  x = jnp.linspace(-3, 3, 16, dtype=jnp.bfloat16).reshape(2, 8)
  y = layers.scaled_activation(name)(x)
  assert y.dtype == jnp.bfloat16


def test_unscaled_activation_fn():
  x = np.linspace(-4, 4, 33).astype(np.float32)
  np.testing.assert_allclose(layers.activation_fn('relu')(x), np.maximum(x, 0))
  np.testing.assert_allclose(layers.activation_fn('gelu')(x), _np_gelu_tanh(x), rtol=1e-5,
                             atol=1e-6)


def test_unknown_activation_raises():
  with pytest.raises(ValueError, match="'mish'; valid: gelu, relu, silu"):
    layers.scaled_activation('mish')
  with pytest.raises(ValueError):
    layers.activation_fn('GELU')


# ---------------------------------------------------------------------------
# Scaled weight standardization.
# ---------------------------------------------------------------------------
def np_standardize(w, gain, eps=1e-4):
  """W_hat = (W - mean) * gain / sqrt(max(var * fan_in, eps)), over H, W, I."""
  w = np.asarray(w, np.float64)
  fan_in = w.shape[0] * w.shape[1] * w.shape[2]
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
  return (w - mean) * np.asarray(gain, np.float64) / np.sqrt(np.maximum(var * fan_in, eps))


# A few fixed HWIO shapes (jit compiles once per shape): 3x3 and 1x1, a 5x3
# kernel, and grouped-conv shapes whose I is in_ch / groups (e.g. 2 of 8 channels).
WEIGHT_SHAPES = [(3, 3, 2, 5), (1, 1, 7, 3), (5, 3, 1, 4), (3, 3, 16, 8), (1, 1, 1, 2)]
_standardize = jax.jit(layers.standardize_weight)


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from(WEIGHT_SHAPES), seed=seeds,
       scale=st.sampled_from([1e-4, 1e-3, 0.05, 1.0, 30.0]))
def test_standardize_weight_matches_numpy(shape, seed, scale):
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal(shape) * scale
       + rng.uniform(-2, 2, shape[-1]) * scale).astype(np.float32)
  gain = rng.uniform(-2, 2, shape[-1]).astype(np.float32)
  got = np.asarray(_standardize(jnp.asarray(w), jnp.asarray(gain)))
  want = np_standardize(w, gain)
  assert got.shape == w.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * max(1.0, np.abs(want).max()))


@FAST
@given(shape=st.sampled_from([s for s in WEIGHT_SHAPES if np.prod(s[:3]) >= 2]),
       seed=seeds, scale=st.sampled_from([0.05, 1.0, 30.0]))
def test_standardized_weight_moments(shape, seed, scale):
  """gain = 1: each output unit has mean 0 and fan_in * var = 1."""
  w = (np.random.default_rng(seed).standard_normal(shape) * scale + 0.3 * scale)
  got = np.asarray(_standardize(jnp.asarray(w, jnp.float32),
                                jnp.ones(shape[-1], jnp.float32)), np.float64)
  fan_in = shape[0] * shape[1] * shape[2]
  var = got.var(axis=(0, 1, 2))
  keep = w.var(axis=(0, 1, 2)) * fan_in > 1e-2   # away from the eps floor
  np.testing.assert_allclose(got.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose((var * fan_in)[keep], 1.0, rtol=1e-4)


def test_standardize_weight_eps_floor():
  # A constant filter has var 0: the eps floor must avoid a division by zero.
  w = jnp.full((3, 3, 2, 4), 0.7, jnp.float32)
  got = np.asarray(layers.standardize_weight(w, jnp.ones(4)))
  # w - mean is float32 rounding (~1e-7); divided by sqrt(1e-4), not by 0.
  assert np.all(np.isfinite(got)) and np.abs(got).max() < 1e-4


def test_standardize_weight_bf16_in_bf16_out():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 16, 8)), jnp.bfloat16)
  got = _standardize(w, jnp.ones(8, jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  want = np_standardize(np.asarray(w, np.float32), np.ones(8))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def np_conv_same(x, w, stride=1, groups=1):
  """NHWC x HWIO convolution with TF 'SAME' padding, by explicit loops, float64."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  n, h, wd, c = x.shape
  kh, kw, cin_g, cout = w.shape
  assert cin_g * groups == c and cout % groups == 0
  oh, ow = -(-h // stride), -(-wd // stride)
  ph = max((oh - 1) * stride + kh - h, 0)
  pw = max((ow - 1) * stride + kw - wd, 0)
  xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = np.zeros((n, oh, ow, cout))
  cout_g = cout // groups
  for g in range(groups):
    xg = xp[..., g * cin_g:(g + 1) * cin_g]
    for oy in range(oh):
      for ox in range(ow):
        patch = xg[:, oy * stride:oy * stride + kh, ox * stride:ox * stride + kw, :]
        for o in range(g * cout_g, (g + 1) * cout_g):
          out[:, oy, ox, o] = np.sum(patch * w[None, :, :, :, o], axis=(1, 2, 3))
  return out


def test_np_conv_reference_sanity():
  # The loop reference agrees with scipy on a single-channel stride-1 case.
  from scipy import signal
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 6, 5, 1))
  w = rng.standard_normal((3, 3, 1, 1))
  want = signal.correlate2d(x[0, :, :, 0], w[:, :, 0, 0], mode='same')
  np.testing.assert_allclose(np_conv_same(x, w)[0, :, :, 0], want, rtol=1e-12)


def _wsconv(out_ch, k, stride, groups, name=None):
  return hk.without_apply_rng(hk.transform(lambda x: layers.WSConv2D(
      out_ch, k, stride=stride, feature_group_count=groups, name=name)(x)))


def _random_params(f, x, rng):
  """Parameters with f.init's tree structure (from eval_shape), filled by NumPy.

  Weights ~ N(0, 1); vectors (gain, bias, b) random, half negative, so that a
  forgotten gain or bias shows. Avoids jax.random (slow to compile on CPU).
  """
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  def fill(s):
    if len(s.shape) == 1:
      v = rng.uniform(0.5, 1.5, s.shape) * rng.choice([-1.0, 1.0], s.shape)
    else:
      v = rng.standard_normal(s.shape)
    return jnp.asarray(v, s.dtype)
  return jax.tree_util.tree_map(fill, shapes)


# A typed 'rbg' key: haiku's initializers then compile much faster on CPU than
# with the default threefry keys, and the distribution is the same.
def _init_key(seed=0):
  return jax.random.key(seed, impl='rbg')


@pytest.mark.parametrize('k,stride,groups,hw', [
    (3, 1, 1, (7, 6)), (3, 2, 1, (7, 6)), (3, 1, 2, (6, 6)), (3, 2, 2, (7, 8)),
    (1, 1, 2, (5, 5)), (1, 2, 1, (5, 6)),
])
def test_wsconv_matches_loop_conv(k, stride, groups, hw):
  rng = np.random.default_rng(k * 100 + stride * 10 + groups)
  cin, cout = 4, 6
  x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
  f = _wsconv(cout, k, stride, groups)
  params = _random_params(f, x, rng)
  mod = params['ws_conv2_d']
  assert set(mod) == {'w', 'gain', 'bias'}
  assert mod['w'].shape == (k, k, cin // groups, cout)
  assert mod['gain'].shape == (cout,) and mod['bias'].shape == (cout,)
  got = np.asarray(jax.jit(f.apply)(params, x))
  w_hat = np_standardize(mod['w'], mod['gain'])
  want = np_conv_same(x, w_hat, stride, groups) + np.asarray(mod['bias'], np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_wsconv_init():
  x = np.zeros((1, 1, 1, 64), np.float32)
  params = jax.jit(_wsconv(64, 3, 1, 1).init)(_init_key(), x)['ws_conv2_d']
  np.testing.assert_array_equal(params['gain'], np.ones(64))
  np.testing.assert_array_equal(params['bias'], np.zeros(64))
  w = np.asarray(params['w'])
  # variance scaling 1.0, fan_in = 3 * 3 * 64 = 576: std 1/24, mean 0. With
  # 36864 samples the sampling error of the std is ~0.4%, of the mean ~2e-4.
  assert w.std() == pytest.approx(1 / 24, rel=0.03)
  assert abs(w.mean()) < 2e-3


def test_wsconv_rejects_indivisible_groups():
  with pytest.raises(ValueError):
    jax.eval_shape(_wsconv(6, 3, 1, 4).init, jax.random.PRNGKey(0),
                   np.zeros((1, 4, 4, 6), np.float32))


# ---------------------------------------------------------------------------
# Conv lowering: 'dense' and 'native' compute the same function.
# ---------------------------------------------------------------------------
def _rel_close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-30)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def test_conv_impl_rejects_unknown():
  with pytest.raises(ValueError):
    with layers.conv_impl('winograd'):
      pass


def test_conv_impl_context_restores():
  before = layers.resolved_conv_impl()
  with layers.conv_impl('native'):
    assert layers.resolved_conv_impl() == 'native'
    with layers.conv_impl('dense'):
      assert layers.resolved_conv_impl() == 'dense'
    assert layers.resolved_conv_impl() == 'native'
  assert layers.resolved_conv_impl() == before


@pytest.mark.parametrize('k,stride,groups', [(3, 1, 4), (3, 2, 2), (1, 1, 1), (1, 2, 1)])
def test_dense_and_native_lowering_agree_with_grads(k, stride, groups):
  rng = np.random.default_rng(7 + k + stride + groups)
  x = jnp.asarray(rng.standard_normal((2, 7, 6, 8)), jnp.float32)
  f = _wsconv(12, k, stride, groups)
  params = _random_params(f, x, rng)
  out_shape = jax.eval_shape(f.apply, params, x).shape
  cot = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

  def loss(p, xx):
    out = f.apply(p, xx)
    return jnp.sum(out * cot), out

  results = {}
  for impl in ('native', 'dense'):
    with layers.conv_impl(impl):
      # A fresh jit per impl: the lowering is chosen while tracing.
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
      (_, out), grads = fn(params, x)
    results[impl] = (out, grads)
  (o_n, (gp_n, gx_n)), (o_d, (gp_d, gx_d)) = results['native'], results['dense']
  _rel_close(o_d, o_n)
  _rel_close(gx_d, gx_n)
  for name in ('w', 'gain', 'bias'):
    _rel_close(gp_d['ws_conv2_d'][name], gp_n['ws_conv2_d'][name])
  # Both equal the loop reference (so neither can be wrong in the same way).
  mod = params['ws_conv2_d']
  want = np_conv_same(x, np_standardize(mod['w'], mod['gain']), stride, groups) + mod['bias']
  _rel_close(o_n, want, rtol=1e-4)
  _rel_close(o_d, want, rtol=1e-4)


# ---------------------------------------------------------------------------
# Squeeze-excite.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('ch,ratio,hidden', [(6, 0.5, 3), (8, 0.25, 2), (3, 0.25, 1),
                                             (5, 0.5, 2)])
def test_squeeze_excite_matches_numpy(ch, ratio, hidden):
  rng = np.random.default_rng(ch)
  x = rng.standard_normal((3, 4, 5, ch)).astype(np.float32)
  f = hk.without_apply_rng(hk.transform(
      lambda x: layers.SqueezeExcite(ch, ch, se_ratio=ratio)(x)))
  params = _random_params(f, x, rng)
  assert set(params) == {'squeeze_excite/~/linear', 'squeeze_excite/~/linear_1'}
  assert params['squeeze_excite/~/linear']['w'].shape == (ch, hidden)
  assert params['squeeze_excite/~/linear']['b'].shape == (hidden,)
  assert params['squeeze_excite/~/linear_1']['w'].shape == (hidden, ch)
  assert params['squeeze_excite/~/linear_1']['b'].shape == (ch,)
  # Random biases, half negative, so that the ReLU clips some units.
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype) if p.ndim == 1 else p,
      params)
  got = np.asarray(jax.jit(f.apply)(params, x))
  p0, p1 = params['squeeze_excite/~/linear'], params['squeeze_excite/~/linear_1']
  h = x.astype(np.float64).mean(axis=(1, 2))
  h = np.maximum(h @ np.asarray(p0['w'], np.float64) + p0['b'], 0.0)   # plain ReLU
  h = special.expit(h @ np.asarray(p1['w'], np.float64) + p1['b'])
  assert got.shape == (3, 1, 1, ch)
  np.testing.assert_allclose(got, h[:, None, None, :], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Stochastic depth.
# ---------------------------------------------------------------------------
def _stochdepth(rate, training):
  return hk.transform(lambda x: layers.stochastic_depth(x, rate, training))


@pytest.mark.parametrize('rate', [0.1, 0.3, 0.75])
def test_stochastic_depth_per_example_no_rescale(rate):
  b = 20000
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (b, 2, 3, 4)), jnp.float32)
  y = np.asarray(jax.jit(_stochdepth(rate, True).apply)({}, _init_key(3), x))
  flat, xf = y.reshape(b, -1), np.asarray(x).reshape(b, -1)
  kept = np.all(flat == xf, axis=1)           # kept unscaled: exactly x
  dropped = np.all(flat == 0, axis=1)         # dropped entirely
  assert np.all(kept ^ dropped), 'an example was partly dropped or rescaled'
  # Binomial: std of the drop fraction <= 0.0035; 0.02 is > 5 sigma.
  assert dropped.mean() == pytest.approx(rate, abs=0.02)


def test_stochastic_depth_identity_when_not_training():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 2, 2, 3)), jnp.float32)
  y = _stochdepth(0.5, False).apply({}, None, x)   # no rng needed
  np.testing.assert_array_equal(y, x)
  y = _stochdepth(0.0, True).apply({}, None, x)
  np.testing.assert_array_equal(y, x)


def test_stochastic_depth_differs_with_key():
  x = jnp.ones((256, 1, 1, 1))
  f = _stochdepth(0.5, True)
  a = f.apply({}, _init_key(0), x)
  b = f.apply({}, _init_key(1), x)
  assert not np.array_equal(a, b)


def test_dropout_rescales_and_is_identity_in_eval():
  x = jnp.ones((100, 50))
  f = hk.transform(lambda x, t: layers.dropout(x, 0.2, t))
  np.testing.assert_array_equal(f.apply({}, None, x, False), x)
  y = np.asarray(f.apply({}, _init_key(0), x, True))
  assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.8)}
  assert (y == 0).mean() == pytest.approx(0.2, abs=0.03)


# ---------------------------------------------------------------------------
# signal_stats and check_image_batch.
# ---------------------------------------------------------------------------
@FAST
@given(seed=seeds)
def test_signal_stats_match_numpy(seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((3, 4, 5, 6)) * rng.uniform(0.1, 3, 6)
       + rng.standard_normal(6)).astype(np.float32)
  got = layers.signal_stats(jnp.asarray(x))
  x64 = x.astype(np.float64)
  ch_mean = x64.mean(axis=(0, 1, 2))
  ch_var = x64.var(axis=(0, 1, 2))
  np.testing.assert_allclose(got['avg_sq_mean'], np.mean(ch_mean**2), rtol=1e-4)
  np.testing.assert_allclose(got['avg_var'], np.mean(ch_var), rtol=1e-4)


def test_check_image_batch():
  layers.check_image_batch(np.zeros((1, 4, 4, 3), np.float32), 'M')
  with pytest.raises(ValueError, match='rank 4'):
    layers.check_image_batch(np.zeros((4, 4, 3), np.float32), 'M')
  with pytest.raises(TypeError, match='uint8'):
    layers.check_image_batch(np.zeros((1, 4, 4, 3), np.uint8), 'M')


def _np_avg_pool_2x2_same(x):
  """NumPy reference: 2x2 windows, stride 2, SAME (pad at the end), padding not counted."""
  b, h, w, c = x.shape
  out = np.zeros((b, -(-h // 2), -(-w // 2), c))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      out[:, i, j, :] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].mean(axis=(1, 2))
  return out


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), batch=st.integers(1, 3))
def test_avg_pool_2x2_matches_numpy_and_haiku(h, w, batch):
  x = np.random.default_rng(h * 10 + w).normal(size=(batch, h, w, 5)).astype(np.float32)
  got = np.asarray(layers.avg_pool_2x2(jnp.asarray(x)))
  np.testing.assert_allclose(got, _np_avg_pool_2x2_same(x.astype(np.float64)), rtol=1e-6,
                             atol=1e-6)
  haiku_pool = hk.avg_pool(x, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
  np.testing.assert_allclose(got, np.asarray(haiku_pool), rtol=1e-6, atol=1e-6)
