"""Tests for nfnet_jax.models.layers against independent references.

Every expected value is computed from the definitions in 2101.08692 (section 4)
and 2102.06171 (section 3), or from DeepMind's released base.py: numerical
integration for the activation gammas, float64 NumPy (tests/helpers.py) for
weight standardization, convolution, squeeze-excite and pooling, and an
independent recurrence for the signal bookkeeping. Nothing is copied from
running the code under test.
"""

import math

import haiku as hk
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, signal, special

from nfnet_jax.models import layers
from tests import helpers
from tests.helpers import GAMMAS, NP_ACTIVATIONS, np_conv, np_standardize

FAST = settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------
# Gamma-scaled activations.
# ---------------------------------------------------------------------------
def _normal_pdf(x):
  return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _expect(g):
  """E[g(z)], z ~ N(0, 1), by adaptive quadrature."""
  return integrate.quad(
    lambda z: float(g(z)) * _normal_pdf(z), -np.inf, np.inf, epsabs=1e-13, epsrel=1e-12, limit=200
  )[0]


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


def test_activation_table_matches_the_released_one():
  # Plus 'swish', the released NF_RegNet's default name for SiLU.
  assert set(layers.ACTIVATION_GAMMAS) == set(GAMMAS) | {'swish'}
  for name, gamma in GAMMAS.items():
    assert layers.ACTIVATION_GAMMAS[name] == pytest.approx(gamma, rel=1e-7), name


def test_swish_is_scaled_silu():
  x = np.linspace(-6, 6, 101).astype(np.float32)
  want = NP_ACTIVATIONS['silu'](x.astype(np.float64)) * GAMMAS['silu']
  np.testing.assert_allclose(layers.scaled_activation('swish')(x), want, rtol=1e-6, atol=1e-6)


GAMMA_RTOL = 1.5e-3


@pytest.mark.parametrize('name', sorted(GAMMAS))
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
  for a, b in [
    ('gelu', 'relu'),
    ('gelu', 'leaky_relu'),
    ('silu', 'gelu'),
    ('softplus', 'soft_sign'),
    ('elu', 'selu'),
  ]:
    assert abs(GAMMAS[a] / _integrated_gamma(b) - 1) > GAMMA_RTOL, (a, b)


def test_log_softmax_std_on_long_vector_is_one():
  # A sampled check of the limit argument in _integrated_gamma.
  z = np.random.default_rng(0).standard_normal((8, 4096))
  lsm = z - special.logsumexp(z, axis=-1, keepdims=True)
  assert np.std(lsm) == pytest.approx(1.0, abs=0.01)


@FAST
@given(
  name=st.sampled_from(sorted(NP_ACTIVATIONS)), seed=seeds, scale=st.sampled_from([0.1, 1.0, 5.0])
)
def test_scaled_activation_equals_f_times_gamma(name, seed, scale):
  x = (np.random.default_rng(seed).standard_normal((3, 17)) * scale).astype(np.float32)
  got = np.asarray(layers.scaled_activation(name)(jnp.asarray(x)))
  want = NP_ACTIVATIONS[name](x.astype(np.float64)) * GAMMAS[name]
  assert got.dtype == np.float32 and got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@FAST
@given(seed=seeds)
def test_scaled_glu_and_log_softmax(seed):
  x = np.random.default_rng(seed).standard_normal((4, 10)).astype(np.float32)
  x64 = x.astype(np.float64)
  got = np.asarray(layers.scaled_activation('glu')(jnp.asarray(x)))
  want = x64[:, :5] * special.expit(x64[:, 5:]) * GAMMAS['glu']
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  got = np.asarray(layers.scaled_activation('log_softmax')(jnp.asarray(x)))
  want = (x64 - special.logsumexp(x64, axis=-1, keepdims=True)) * GAMMAS['log_softmax']
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('name', sorted(GAMMAS))
def test_scaled_activation_keeps_bf16(name):
  x = jnp.linspace(-3, 3, 16, dtype=jnp.bfloat16).reshape(2, 8)
  y = layers.scaled_activation(name)(x)
  assert y.dtype == jnp.bfloat16


def test_unscaled_activation_fn():
  x = np.linspace(-4, 4, 33).astype(np.float32)
  np.testing.assert_allclose(layers.activation_fn('relu')(x), np.maximum(x, 0))
  np.testing.assert_allclose(
    layers.activation_fn('gelu')(x), helpers.np_gelu_tanh(x), rtol=1e-5, atol=1e-6
  )


def test_unknown_activation_raises():
  with pytest.raises(ValueError, match="'mish'; valid: gelu, relu, silu"):
    layers.scaled_activation('mish')
  with pytest.raises(ValueError):
    layers.activation_fn('GELU')


# ---------------------------------------------------------------------------
# Scaled weight standardization.
# ---------------------------------------------------------------------------
# A few fixed HWIO shapes (jit compiles once per shape): 3x3 and 1x1, a 5x3
# kernel, and grouped-conv shapes whose I is in_ch / groups (e.g. 2 of 8 channels).
WEIGHT_SHAPES = [(3, 3, 2, 5), (1, 1, 7, 3), (5, 3, 1, 4), (3, 3, 16, 8), (1, 1, 1, 2)]
_standardize = jax.jit(layers.standardize_weight)


@settings(max_examples=30, deadline=None)
@given(
  shape=st.sampled_from(WEIGHT_SHAPES),
  seed=seeds,
  scale=st.sampled_from([1e-4, 1e-3, 0.05, 1.0, 30.0]),
)
def test_standardize_weight_matches_numpy(shape, seed, scale):
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal(shape) * scale + rng.uniform(-2, 2, shape[-1]) * scale).astype(
    np.float32
  )
  gain = rng.uniform(-2, 2, shape[-1]).astype(np.float32)
  got = np.asarray(_standardize(jnp.asarray(w), jnp.asarray(gain)))
  want = np_standardize(w, gain)
  assert got.shape == w.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * max(1.0, np.abs(want).max()))


@FAST
@given(
  shape=st.sampled_from([s for s in WEIGHT_SHAPES if np.prod(s[:3]) >= 2]),
  seed=seeds,
  scale=st.sampled_from([0.05, 1.0, 30.0]),
)
def test_standardized_weight_moments(shape, seed, scale):
  """gain = 1: each output unit has mean 0 and fan_in * var = 1."""
  w = np.random.default_rng(seed).standard_normal(shape) * scale + 0.3 * scale
  got = np.asarray(
    _standardize(jnp.asarray(w, jnp.float32), jnp.ones(shape[-1], jnp.float32)), np.float64
  )
  fan_in = shape[0] * shape[1] * shape[2]
  var = got.var(axis=(0, 1, 2))
  keep = w.var(axis=(0, 1, 2)) * fan_in > 1e-2  # away from the eps floor
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


def test_np_conv_reference_sanity():
  # The NumPy reference agrees with scipy on a single-channel stride-1 case ...
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 6, 5, 1))
  w = rng.standard_normal((3, 3, 1, 1))
  want = signal.correlate2d(x[0, :, :, 0], w[:, :, 0, 0], mode='same')
  np.testing.assert_allclose(np_conv(x, w)[0, :, :, 0], want, rtol=1e-12)
  # ... with several channels (a sum of per-channel correlations) ...
  x = rng.standard_normal((1, 6, 5, 4))
  w = rng.standard_normal((3, 3, 4, 1))
  want = sum(signal.correlate2d(x[0, :, :, c], w[:, :, c, 0], mode='same') for c in range(4))
  np.testing.assert_allclose(np_conv(x, w)[0, :, :, 0], want, rtol=1e-12)
  # ... and grouped: the same as a dense conv with block-diagonal weights.
  w = rng.standard_normal((3, 3, 2, 6))
  dense = np.zeros((3, 3, 4, 6))
  dense[:, :, :2, :3], dense[:, :, 2:, 3:] = w[..., :3], w[..., 3:]
  for stride in (1, 2):
    np.testing.assert_allclose(
      np_conv(x, w, stride, groups=2), np_conv(x, dense, stride), rtol=1e-12
    )


def _wsconv(out_ch, k, stride, groups, name=None):
  return hk.without_apply_rng(
    hk.transform(
      lambda x: layers.WSConv2D(out_ch, k, stride=stride, feature_group_count=groups, name=name)(x)
    )
  )


def _random_params(f, x, rng):
  """helpers.random_params in f.init's tree structure (from eval_shape)."""
  return helpers.random_params(jax.eval_shape(f.init, jax.random.PRNGKey(0), x), rng)


# A typed 'rbg' key: haiku's initializers then compile much faster on CPU than
# with the default threefry keys, and the distribution is the same.
def _init_key(seed=0):
  return jax.random.key(seed, impl='rbg')


@pytest.mark.parametrize(
  'k,stride,groups,hw',
  [
    (3, 1, 1, (7, 6)),
    (3, 2, 1, (7, 6)),
    (3, 1, 2, (6, 6)),
    (3, 2, 2, (7, 8)),
    (1, 1, 2, (5, 5)),
    (1, 2, 1, (5, 6)),
  ],
)
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
  want = helpers.np_wsconv(x, mod, stride, groups)
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
    jax.eval_shape(
      _wsconv(6, 3, 1, 4).init, jax.random.PRNGKey(0), np.zeros((1, 4, 4, 6), np.float32)
    )


# ---------------------------------------------------------------------------
# Conv lowering: 'dense' and 'native' compute the same function.
# ---------------------------------------------------------------------------
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
  o_n, o_d = helpers.assert_lowerings_agree(f.apply, params, x, rng)
  # Both equal the NumPy reference (so neither can be wrong in the same way).
  mod = params['ws_conv2_d']
  want = helpers.np_wsconv(x, mod, stride, groups)
  helpers.assert_close(o_n, want, rtol=1e-4)
  helpers.assert_close(o_d, want, rtol=1e-4)


# ---------------------------------------------------------------------------
# Squeeze-excite.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('ch,ratio,hidden', [(6, 0.5, 3), (8, 0.25, 2), (3, 0.25, 1), (5, 0.5, 2)])
def test_squeeze_excite_matches_numpy(ch, ratio, hidden):
  rng = np.random.default_rng(ch)
  x = rng.standard_normal((3, 4, 5, ch)).astype(np.float32)
  f = hk.without_apply_rng(hk.transform(lambda x: layers.SqueezeExcite(ch, ch, se_ratio=ratio)(x)))
  params = _random_params(f, x, rng)
  assert set(params) == {'squeeze_excite/~/linear', 'squeeze_excite/~/linear_1'}
  assert params['squeeze_excite/~/linear']['w'].shape == (ch, hidden)
  assert params['squeeze_excite/~/linear']['b'].shape == (hidden,)
  assert params['squeeze_excite/~/linear_1']['w'].shape == (hidden, ch)
  assert params['squeeze_excite/~/linear_1']['b'].shape == (ch,)
  # Random biases, half negative, so that the ReLU clips some units.
  params = jax.tree_util.tree_map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype) if p.ndim == 1 else p, params
  )
  got = np.asarray(jax.jit(f.apply)(params, x))
  want = helpers.np_se(
    x, params['squeeze_excite/~/linear'], params['squeeze_excite/~/linear_1']
  )  # a plain ReLU
  assert got.shape == (3, 1, 1, ch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


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
  kept = np.all(flat == xf, axis=1)  # kept unscaled: exactly x
  dropped = np.all(flat == 0, axis=1)  # dropped entirely
  assert np.all(kept ^ dropped), 'an example was partly dropped or rescaled'
  # Binomial: std of the drop fraction <= 0.0035; 0.02 is > 5 sigma.
  assert dropped.mean() == pytest.approx(rate, abs=0.02)


def test_stochastic_depth_identity_when_not_training():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 2, 2, 3)), jnp.float32)
  y = _stochdepth(0.5, False).apply({}, None, x)  # no rng needed
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
  x = (rng.standard_normal((3, 4, 5, 6)) * rng.uniform(0.1, 3, 6) + rng.standard_normal(6)).astype(
    np.float32
  )
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


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), batch=st.integers(1, 3))
def test_avg_pool_2x2_matches_numpy_and_haiku(h, w, batch):
  x = np.random.default_rng(h * 10 + w).normal(size=(batch, h, w, 5)).astype(np.float32)
  got = np.asarray(layers.avg_pool_2x2(jnp.asarray(x)))
  np.testing.assert_allclose(got, helpers.np_avg_pool_2x2(x), rtol=1e-6, atol=1e-6)
  haiku_pool = hk.avg_pool(x, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
  np.testing.assert_allclose(got, np.asarray(haiku_pool), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Signal bookkeeping: signal_plan (2101.08692, section 4).
# ---------------------------------------------------------------------------
def test_signal_plan_reproduces_f0_betas():
  plan = list(layers.signal_plan(helpers.NFNET_DEPTHS['F0'], 0.2, 0.0))
  np.testing.assert_allclose([p.beta for p in plan], helpers.F0_BETAS, atol=5e-5)
  # The independent recurrence gives the same four-decimal values.
  np.testing.assert_allclose(
    helpers.recurrence_betas(helpers.NFNET_DEPTHS['F0']), helpers.F0_BETAS, atol=5e-5
  )


@FAST
@given(
  depths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
  alpha=st.floats(0.0, 1.0),
  rate=st.floats(0.0, 0.9),
)
def test_signal_plan_matches_the_recurrence(depths, alpha, rate):
  plan = list(layers.signal_plan(depths, alpha, rate))
  n = sum(depths)
  assert [p.index for p in plan] == list(range(n))
  assert [(p.stage, p.index_in_stage) for p in plan] == [
    (s, b) for s, d in enumerate(depths) for b in range(d)
  ]
  np.testing.assert_allclose(
    [p.beta for p in plan], helpers.recurrence_betas(depths, alpha), rtol=1e-12
  )
  # Stochastic-depth rates are linear in the block's index over the network.
  np.testing.assert_allclose(
    [p.stochdepth_rate for p in plan], [rate * i / n for i in range(n)], rtol=1e-12, atol=0
  )


def test_signal_plan_resets_after_each_transition():
  """Expected variances, written out: the input has variance 1; the k-th block
  after a stage's first one sees 1 + k alpha^2 (that first block's shortcut
  restarts at 1); the next stage's first block sees the whole previous stage's
  1 + depth * alpha^2."""
  plan = list(layers.signal_plan([4, 3], 0.5, 0.0))
  variances = [
    1,
    1 + 0.25,
    1 + 2 * 0.25,
    1 + 3 * 0.25,  # stage 0
    1 + 4 * 0.25,
    1 + 0.25,
    1 + 2 * 0.25,
  ]  # stage 1
  want = [1 / math.sqrt(v) for v in variances]
  np.testing.assert_allclose([p.beta for p in plan], want, rtol=1e-12)
