"""The 'dense' lowering (the CPU default) computes what the 'native' one does.

Weight standardisation under 'dense' has a hand-written gradient; the convolutions split
groups, turn 1x1 convs into dot products and take the kernel gradients of large spatial
convs tap by tap.
Both must give the native lowering's outputs and gradients to float32 rounding (1e-5 of
each tensor's largest entry), and the parameter tree must not depend on the lowering.
"""

import contextlib

import haiku as hk
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax.models import layers
from tests import helpers

seeds = st.integers(0, 2**31 - 1)


def _standardize_and_grads(impl, w, gain, cot):
  with layers.conv_impl(impl):
    # A fresh trace per lowering: it is chosen while tracing.
    fn = jax.jit(
      jax.value_and_grad(
        lambda w, g: jnp.sum(layers.standardize_weight(w, g) * cot), argnums=(0, 1)
      )
    )
    out = jax.jit(layers.standardize_weight)(w, gain)
    _, (gw, gg) = fn(w, gain)
  return out, gw, gg


@settings(max_examples=15, deadline=None)
@given(
  kh=st.sampled_from([1, 3]),
  kw=st.sampled_from([1, 3]),
  # fan_in >= 3: with 1 or 2 inputs per unit the standardised weight is constant in w,
  # its gradient zero up to rounding, and a relative comparison meaningless.
  fan=st.integers(3, 24),
  out=st.integers(1, 10),
  scale=st.sampled_from([1e-3, 0.05, 1.0, 20.0]),
  offset=st.sampled_from([0.0, 0.5]),
  seed=seeds,
)
def test_weight_standardization_lowerings_agree(kh, kw, fan, out, scale, offset, seed):
  rng = np.random.default_rng(seed)
  shape = (kh, kw, fan, out)
  w = jnp.asarray((rng.standard_normal(shape) + offset) * scale, jnp.float32)
  gain = jnp.asarray(rng.uniform(-2, 2, out), jnp.float32)
  cot = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  native = _standardize_and_grads('native', w, gain, cot)
  dense = _standardize_and_grads('dense', w, gain, cot)
  for d, n in zip(dense, native):
    helpers.assert_close(d, n, rtol=1e-5)
  # And both are the float64 NumPy formula.
  want = helpers.np_standardize(np.asarray(w), np.asarray(gain))
  helpers.assert_close(dense[0], want, rtol=1e-5)


def test_weight_standardization_gradient_where_the_variance_floor_holds():
  """Units whose sum of squares is below eps (here a constant column and a tiny one)
  take the floor: their scale is a constant there, and the dense lowering's gradient
  must drop the variance term as the native formula's does."""
  rng = np.random.default_rng(0)
  # fan_in 32: the constant column's mean is exact, its centred values exactly 0.
  w = rng.standard_normal((2, 2, 8, 3)).astype(np.float32)
  w[..., 0] = 0.25  # variance 0
  w[..., 1] *= 1e-4  # sum of squares ~4e-7 < eps = 1e-4
  gain = np.asarray([1.5, -0.7, 2.0], np.float32)
  cot = rng.standard_normal(w.shape).astype(np.float32)
  native = _standardize_and_grads('native', jnp.asarray(w), gain, cot)
  dense = _standardize_and_grads('dense', jnp.asarray(w), gain, cot)
  for d, n in zip(dense, native):
    helpers.assert_close(d, n, rtol=1e-5)


def _wsconv(out_ch, k, stride, groups):
  return hk.without_apply_rng(
    hk.transform(lambda x: layers.WSConv2D(out_ch, k, stride=stride, feature_group_count=groups)(x))
  )


@settings(max_examples=6, deadline=None)
@given(
  k=st.sampled_from([1, 3]),
  stride=st.sampled_from([1, 2]),
  groups=st.sampled_from([1, 2, 3]),
  in_per_group=st.integers(3, 4),  # fan_in >= 3, as above
  out_per_group=st.integers(1, 3),
  height=st.integers(2, 6),
  width=st.integers(2, 6),
  seed=seeds,
)
def test_wsconv_lowerings_agree_with_grads(
  k, stride, groups, in_per_group, out_per_group, height, width, seed
):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, height, width, groups * in_per_group)), jnp.float32)
  f = _wsconv(groups * out_per_group, k, stride, groups)
  params = f.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  o_native, o_dense = helpers.assert_lowerings_agree(f.apply, params, x, rng)
  want = helpers.np_wsconv(x, params['ws_conv2_d'], stride, groups)
  helpers.assert_close(o_native, want, rtol=1e-4)
  helpers.assert_close(o_dense, want, rtol=1e-4)


@contextlib.contextmanager
def _taps_everywhere():
  saved = layers.TAP_GRAD_MIN_POSITIONS, layers.TAP_GRAD_MIN_CHANNELS
  layers.TAP_GRAD_MIN_POSITIONS = layers.TAP_GRAD_MIN_CHANNELS = 1
  try:
    yield
  finally:
    layers.TAP_GRAD_MIN_POSITIONS, layers.TAP_GRAD_MIN_CHANNELS = saved


def _conv_grads(impl, x, w, stride, padding, cot):
  with layers.conv_impl(impl):
    loss = lambda x, w: jnp.sum(layers.conv2d(x, w, stride, padding) * cot)  # noqa: E731
    if impl == 'native' and not isinstance(padding, str):
      # The reference pads in the test itself, independently of `layers.conv2d`'s own
      # explicit padding (see there: XLA:CPU's gradient of a padding beyond kernel - 1).
      pads = ((0, 0), *padding, (0, 0))
      loss = lambda x, w: jnp.sum(  # noqa: E731
        layers.conv2d(jnp.pad(x, pads), w, stride, 'VALID') * cot
      )
    jaxpr = str(jax.make_jaxpr(loss)(x, w))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w), jaxpr


@settings(max_examples=8, deadline=None)
@given(
  k=st.sampled_from([2, 3, 5]),
  stride=st.sampled_from([1, 2]),
  padding=st.sampled_from(['SAME', 'VALID', ((2, 0), (1, 3))]),
  batch=st.integers(1, 2),
  positions=st.integers(3, 6),
  in_ch=st.integers(1, 5),
  out_ch=st.integers(1, 4),
  seed=seeds,
)
def test_tap_kernel_gradient_agrees_with_native(
  k, stride, padding, batch, positions, in_ch, out_ch, seed
):
  """The dense lowering's kernel gradient tap by tap (here on every conv: the thresholds
  lowered to 1, so that small shapes exercise it) gives XLA's own input and kernel
  gradients."""
  rng = np.random.default_rng(seed)
  size = positions * stride + k  # >= 1 output position for every padding
  x = jnp.asarray(rng.standard_normal((batch, size, size - 1, in_ch)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, in_ch, out_ch)), jnp.float32)
  with layers.conv_impl('native'):
    cot = jnp.asarray(rng.standard_normal(layers.conv2d(x, w, stride, padding).shape))
  (dx_native, dw_native), _ = _conv_grads('native', x, w, stride, padding, cot)
  with _taps_everywhere():
    (dx_dense, dw_dense), jaxpr = _conv_grads('dense', x, w, stride, padding, cot)
  assert 'custom_vjp_call' in jaxpr  # the tap path ran
  helpers.assert_close(dx_dense, dx_native, rtol=1e-5)
  helpers.assert_close(dw_dense, dw_native, rtol=1e-5)


def test_small_outputs_keep_xlas_kernel_gradient():
  """Below the thresholds XLA's own kernel gradient is as fast: no custom rule."""
  x = jnp.ones((2, 8, 8, 32))  # 64 output positions
  w = jnp.ones((3, 3, 32, 4))
  _, jaxpr = _conv_grads('dense', x, w, 1, 'SAME', jnp.ones((2, 8, 8, 4)))
  assert 'custom_vjp_call' not in jaxpr
  x = jnp.ones((1, 32, 32, layers.TAP_GRAD_MIN_CHANNELS - 1))  # too few input channels
  w = jnp.ones((3, 3, x.shape[-1], 4))
  _, jaxpr = _conv_grads('dense', x, w, 1, 'SAME', jnp.ones((1, 32, 32, 4)))
  assert 'custom_vjp_call' not in jaxpr


def test_tap_kernel_gradient_keeps_the_kernel_dtype():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 24, 24, 16)), jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 16, 2)), jnp.bfloat16)
  cot = jnp.ones((1, 24, 24, 2), jnp.bfloat16)
  (dx, dw), jaxpr = _conv_grads('dense', x, w, 1, 'SAME', cot)
  assert 'custom_vjp_call' in jaxpr
  assert dx.dtype == dw.dtype == jnp.bfloat16
  (_, dw_native), _ = _conv_grads('native', x, w, 1, 'SAME', cot)
  # bf16 keeps ~3 significant digits; the taps accumulate in float32.
  helpers.assert_close(dw.astype(jnp.float32), dw_native.astype(jnp.float32), rtol=2e-2)


def test_parameter_tree_does_not_depend_on_the_lowering():
  x = jnp.zeros((1, 8, 8, 6))
  trees = {}
  for impl in ('native', 'dense'):
    with layers.conv_impl(impl):
      params = _wsconv(12, 3, 2, 3).init(jax.random.PRNGKey(0), x)
    trees[impl] = jax.tree.map(lambda p: (p.shape, p.dtype), params)
  assert trees['native'] == trees['dense']
  assert trees['dense'] == {
    'ws_conv2_d': {
      'w': ((3, 3, 2, 12), jnp.float32),
      'gain': ((12,), jnp.float32),
      'bias': ((12,), jnp.float32),
    }
  }
