"""Layers shared by every normalizer-free family (NFNet, NF-ResNet, NF-RegNet).

Everything here is the part of "Characterizing signal propagation to close the
performance gap in unnormalized ResNets" (Brock et al. 2021a, arXiv 2101.08692)
that the NFNet paper (arXiv 2102.06171) builds on: scaled weight standardization,
gamma-scaled activations, squeeze-excite and stochastic depth.
"""

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Iterator, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------
# Gamma-scaled activations.
#
# gamma = 1 / std(f(z)) for z ~ N(0, 1), so that f(z) * gamma keeps unit
# variance at initialisation (2101.08692, section 4.2). These exact constants
# are the ones the released weights were trained with; tests re-derive them by
# numerical integration.
# ---------------------------------------------------------------------------
_ACTIVATIONS = {
  # The authors' code calls jax.nn.gelu with its default, the tanh approximation.
  'gelu': (lambda x: jax.nn.gelu(x, approximate=True), 1.7015043497085571),
  'relu': (jax.nn.relu, 1.7139588594436646),
  'silu': (jax.nn.silu, 1.7881293296813965),
  # The released NF_RegNet's default name for SiLU (its own table lacks it).
  'swish': (jax.nn.silu, 1.7881293296813965),
  'elu': (jax.nn.elu, 1.2716004848480225),
  'celu': (jax.nn.celu, 1.270926833152771),
  'leaky_relu': (jax.nn.leaky_relu, 1.70590341091156),
  'relu6': (jax.nn.relu6, 1.7131484746932983),
  'selu': (jax.nn.selu, 1.0008515119552612),
  'sigmoid': (jax.nn.sigmoid, 4.803835391998291),
  'softplus': (jax.nn.softplus, 1.9203323125839233),
  'tanh': (jnp.tanh, 1.5939117670059204),
  'soft_sign': (jax.nn.soft_sign, 2.338853120803833),
  'log_sigmoid': (jax.nn.log_sigmoid, 1.9193484783172607),
  'glu': (jax.nn.glu, 1.8484294414520264),
  'log_softmax': (jax.nn.log_softmax, 1.0002083778381348),
  'identity': (lambda x: x, 1.0),
}
ACTIVATION_GAMMAS = {name: gamma for name, (_, gamma) in _ACTIVATIONS.items()}
ACTIVATIONS = tuple(_ACTIVATIONS)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The unscaled activation `f` (e.g. for the squeeze-excite's plain ReLU)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; valid: {", ".join(ACTIVATIONS)}.')
  return _ACTIVATIONS[name][0]


def scaled_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """`x -> f(x) * gamma_f`, the variance-preserving activation."""
  fn = activation_fn(name)
  gamma = _ACTIVATIONS[name][1]
  # gamma is cast to x's dtype so bf16 activations stay bf16.
  return lambda x: fn(x) * jnp.asarray(gamma, x.dtype)


# ---------------------------------------------------------------------------
# How convolutions are lowered.
#
# XLA's CPU backend lowers feature_group_count convolutions (and above all their
# gradients) to slow generic loops, and runs 1x1 convolutions well below the
# speed of the equivalent matrix product. The 'dense' lowering computes exactly
# the same function from the same parameters: a grouped conv becomes `groups`
# dense convs on channel slices, a 1x1 stride-1 conv a dot product over
# channels; large spatial convs take their kernel gradient tap by tap
# (`_conv_with_tap_grad`). On GPU/TPU the native lowering is fast, so 'auto' picks by backend.
# docs/benchmarks.md has the measurements behind this choice.
# ---------------------------------------------------------------------------
CONV_IMPLS = ('auto', 'native', 'dense')
_conv_impl = 'auto'


@contextlib.contextmanager
def conv_impl(impl: str):
  """Choose how convolutions are lowered while tracing inside this context."""
  global _conv_impl
  if impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv impl {impl!r}; valid: {", ".join(CONV_IMPLS)}.')
  previous, _conv_impl = _conv_impl, impl
  try:
    yield
  finally:
    _conv_impl = previous


def resolved_conv_impl() -> str:
  if _conv_impl != 'auto':
    return _conv_impl
  return 'dense' if jax.default_backend() == 'cpu' else 'native'


def _conv(x: jax.Array, w: jax.Array, stride: int, padding, groups: int = 1) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    w,
    window_strides=(stride, stride),
    padding=padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


# The dense lowering takes a spatial kernel's gradient tap by tap when the output has at
# least this many positions per image and the input at least this many channels (see
# `_conv_with_tap_grad`); below either, XLA's own kernel-gradient convolution is as fast.
TAP_GRAD_MIN_POSITIONS = 512
TAP_GRAD_MIN_CHANNELS = 16


def _kernel_grad_by_taps(x, dy, kernel_shape, stride: int, pads) -> jax.Array:
  """dL/dW of `_conv(x, W)` given dL/dy: for each kernel tap (i, j), the strided window
  of the padded input it multiplies, contracted with dy over batch and positions."""
  kh, kw = kernel_shape
  n, ho, wo, _ = dy.shape
  ci, co = x.shape[-1], dy.shape[-1]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  dy2d = dy.reshape(n * ho * wo, co)
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = jax.lax.slice(
        xp,
        (0, i, j, 0),
        (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, ci),
        (1, stride, stride, 1),
      )
      taps.append(
        jax.lax.dot_general(
          window.reshape(n * ho * wo, ci),
          dy2d,
          (((0,), (0,)), ((), ())),
          preferred_element_type=jnp.float32,
        )
      )
  return jnp.stack(taps).reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_tap_grad(x: jax.Array, w: jax.Array, stride: int, pads) -> jax.Array:
  """`_conv(x, w)`, whose kernel gradient is `_kernel_grad_by_taps`.

  XLA's CPU backend computes a convolution's kernel gradient as another convolution over
  the input transposed to [C, H, W, N] (a strided copy, slow with a small batch minor),
  and that convolution itself runs well below its forward's speed. At 32-64 px this is
  the largest single cost in NFNet's backward pass; kh * kw matrix products over the
  strided windows compute the same sums 1.5-2.5x faster there.
  """
  return _conv(x, w, stride, pads)


def _conv_with_tap_grad_fwd(x, w, stride, pads):
  return _conv(x, w, stride, pads), (x, w)


def _conv_with_tap_grad_bwd(stride, pads, residuals, dy):
  x, w = residuals
  (dx,) = jax.linear_transpose(lambda x_: _conv(x_, w, stride, pads), x)(dy)
  dw = _kernel_grad_by_taps(x, dy, w.shape[:2], stride, pads)
  return dx, dw.astype(w.dtype)


_conv_with_tap_grad.defvjp(_conv_with_tap_grad_fwd, _conv_with_tap_grad_bwd)


def _dense_conv(x: jax.Array, w: jax.Array, stride: int, padding) -> jax.Array:
  kh, kw, ci, _ = w.shape
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (stride, stride), padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  ho, wo = (
    (size + lo + hi - k) // stride + 1 for size, (lo, hi), k in zip(x.shape[1:3], pads, (kh, kw))
  )
  if (kh, kw) != (1, 1) and ho * wo >= TAP_GRAD_MIN_POSITIONS and ci >= TAP_GRAD_MIN_CHANNELS:
    return _conv_with_tap_grad(x, w, stride, pads)
  return _conv(x, w, stride, pads)


def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: str, groups: int = 1) -> jax.Array:
  """NHWC x HWIO convolution; grouped when groups > 1. `padding`: 'SAME', 'VALID' or
  ((top, bottom), (left, right))."""
  if not isinstance(padding, str) and any(
    p > k - 1 for side, k in zip(padding, w.shape[:2]) for p in side
  ):
    # Padding a side by more than kernel - 1 makes the input gradient a convolution with
    # negative padding, which XLA:CPU (jaxlib 0.10.2) fills in part with unrelated memory
    # (tests/models/test_conv_lowering.py). Padded explicitly, the gradient is a slice.
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    padding = 'VALID'
  if resolved_conv_impl() == 'native':
    return _conv(x, w, stride, padding, groups)
  if w.shape[:2] == (1, 1) and stride == 1 and groups == 1:
    return jnp.einsum('nhwc,co->nhwo', x, w[0, 0])
  if groups == 1:
    return _dense_conv(x, w, stride, padding)
  # feature_group_count=g maps input channel block i to output block i.
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate([_dense_conv(xi, wi, stride, padding) for xi, wi in zip(xs, ws)], axis=-1)


# ---------------------------------------------------------------------------
# Scaled weight standardization (2101.08692, eq. 2 / 2102.06171 section 3).
# ---------------------------------------------------------------------------
def standardize_weight(w: jax.Array, gain: jax.Array, eps: float = 1e-4) -> jax.Array:
  """W_hat = (W - mean) * gain / sqrt(max(var * fan_in, eps)), per output unit.

  The mean and variance run over all axes but the last (HWIO: H, W, I), and
  fan_in = kh * kw * in_channels_per_group. Computed in float32 whatever the
  compute dtype, because the variance of a few hundred bf16 numbers is coarse.
  """
  compute_dtype = w.dtype
  w32 = w.astype(jnp.float32)
  gain32 = gain.astype(jnp.float32)
  fan_in = int(np.prod(w.shape[:-1]))
  if resolved_conv_impl() == 'dense':
    w_hat = _standardize_columns(w32.reshape(fan_in, w.shape[-1]), gain32, eps)
    return w_hat.reshape(w.shape).astype(compute_dtype)
  axes = tuple(range(w.ndim - 1))
  mean = jnp.mean(w32, axis=axes, keepdims=True)
  var = jnp.var(w32, axis=axes, keepdims=True)
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain32
  return ((w32 - mean) * scale).astype(compute_dtype)


def _column_stats(w2d, eps):
  """Per column of the [fan_in, out] kernel: mean, rsqrt(max(var * fan_in, eps)) and
  whether the variance (not the eps floor) sets it."""
  fan_in = w2d.shape[0]
  mean = jnp.mean(w2d, axis=0)
  var_fan_in = jnp.mean(jnp.square(w2d - mean), axis=0) * fan_in
  return mean, jax.lax.rsqrt(jnp.maximum(var_fan_in, eps)), var_fan_in > eps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _standardize_columns(w2d: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
  """`standardize_weight` of a [fan_in, out] float32 kernel, with its gradient by hand.

  With c = w - mean, r = rsqrt(max(fan_in * var, eps)) and g = dL/dW_hat, per column:
    dL/dgain = r * sum(g * c)
    dL/dw    = gain * r * (g - mean(g) - r^2 * sum(g * c) * c)
  (the last term only where the variance, not the floor, sets r). That is two column
  sums and one elementwise pass; XLA's CPU backend, differentiating the formula itself,
  writes out the centred kernel and its square and reads them back several times,
  which over F0's 71 M weights is several percent of the train step. The dense
  lowering (CPU) uses this; 'native' keeps XLA's own gradient.

  Undifferentiated (evaluation), the output is `w * (r * gain) - mean * (r * gain)`, a
  per-column affine map of `w`: XLA then reads the kernel for the two column sums and
  once more for the output, instead of writing the centred kernel out and reading it
  back twice (an F0 evaluation forward ~8% faster on a 2-core CPU, docs/benchmarks.md,
  "Seventh round"). The two forms agree to float32 rounding. The differentiated
  forward keeps the centred kernel, which its gradient reads again.
  """
  mean, r, _ = _column_stats(w2d, eps)
  scale = r * gain
  return w2d * scale - mean * scale


def _standardize_columns_fwd(w2d, gain, eps):
  mean, r, active = _column_stats(w2d, eps)
  return (w2d - mean) * (r * gain), (w2d, gain, mean, r, active)


def _standardize_columns_bwd(eps, residuals, g):
  w2d, gain, mean, r, active = residuals
  centered = w2d - mean
  g_dot_c = jnp.sum(g * centered, axis=0)
  variance_term = jnp.where(active, r * r * g_dot_c, 0.0)
  dw = (gain * r) * (g - jnp.mean(g, axis=0) - variance_term * centered)
  return dw, r * g_dot_c


_standardize_columns.defvjp(_standardize_columns_fwd, _standardize_columns_bwd)


class WSConv2D(hk.Module):
  """2D convolution with scaled weight standardization, a learnable gain and a bias.

  Parameters (names fixed by the released checkpoints): `w` (HWIO), `gain`
  (per output channel, init 1) and `bias` (per output channel, init 0).
  """

  def __init__(
    self,
    output_channels: int,
    kernel_shape: Union[int, Sequence[int]] = 3,
    stride: int = 1,
    padding: str = 'SAME',
    feature_group_count: int = 1,
    w_init: Optional[hk.initializers.Initializer] = None,
    eps: float = 1e-4,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.output_channels = output_channels
    if isinstance(kernel_shape, int):
      kernel_shape = (kernel_shape, kernel_shape)
    self.kernel_shape = tuple(kernel_shape)
    self.stride = stride
    self.padding = padding
    self.groups = feature_group_count
    self.w_init = w_init or hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal')
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    in_ch = x.shape[-1]
    if in_ch % self.groups or self.output_channels % self.groups:
      raise ValueError(
        f'{self.module_name}: {in_ch} input / {self.output_channels} output channels '
        f'are not divisible into {self.groups} groups.'
      )
    w_shape = (*self.kernel_shape, in_ch // self.groups, self.output_channels)
    w = hk.get_parameter('w', w_shape, x.dtype, init=self.w_init)
    gain = hk.get_parameter('gain', (self.output_channels,), x.dtype, init=jnp.ones)
    bias = hk.get_parameter('bias', (self.output_channels,), x.dtype, init=jnp.zeros)
    w_hat = standardize_weight(w, gain, self.eps)
    return conv2d(x, w_hat, self.stride, self.padding, self.groups) + bias


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite (Hu et al. 2018) gate, as the NF families use it.

  The hidden nonlinearity is a plain, unscaled ReLU: the released weights were
  trained that way (it sits off the residual path's variance bookkeeping).
  """

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    se_ratio: float = 0.5,
    hidden_ch: Optional[int] = None,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    hidden_ch = hidden_ch or max(1, int(in_ch * se_ratio))
    # Created here, not in __call__, so the parameter paths are
    # `squeeze_excite/~/linear` and `squeeze_excite/~/linear_1` as released.
    self.fc0 = hk.Linear(hidden_ch, with_bias=True)
    self.fc1 = hk.Linear(out_ch, with_bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2))  # squeeze: [B, C]
    h = jax.nn.relu(self.fc0(h))
    h = jax.nn.sigmoid(self.fc1(h))
    return h[:, None, None, :]  # excite: broadcast over H, W


def stochastic_depth(x: jax.Array, drop_rate: float, is_training: bool) -> jax.Array:
  """Drops the residual branch per example (Huang et al. 2016).

  One Bernoulli draw per example (mask [B, 1, 1, 1]) and, unlike dropout, no
  1 / keep_prob rescaling: the released weights were trained without it.
  """
  if not is_training or not drop_rate:
    return x
  keep = jax.random.bernoulli(
    hk.next_rng_key(), 1.0 - drop_rate, (x.shape[0],) + (1,) * (x.ndim - 1)
  )
  return x * keep.astype(x.dtype)


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  if not is_training or not rate:
    return x
  return hk.dropout(hk.next_rng_key(), rate, x)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, SAME padding, padding excluded from the average.

  The same function as `hk.avg_pool(x, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')`,
  written as a reshape and a sum. XLA's CPU backend (jaxlib 0.10.2) miscomputes
  the padded `reduce_window` behind hk.avg_pool inside larger fusions when a
  side is odd (e.g. a 1x1 map): a batch of 360 got 4x the value a batch of 16
  got. The reshape form has no padding window to get wrong, and is cheaper.
  """
  b, h, w, c = x.shape
  ph, pw = h % 2, w % 2  # SAME pads odd sides at the end only
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  oh, ow = (h + ph) // 2, (w + pw) // 2
  summed = x.reshape(b, oh, 2, ow, 2, c).sum(axis=(2, 4))
  counts = np.full((oh, ow), 4.0, np.float32)
  if ph:
    counts[-1, :] /= 2
  if pw:
    counts[:, -1] /= 2
  return summed / jnp.asarray(counts[None, :, :, None], x.dtype)


def pooled_shortcut(
  x: jax.Array, out: jax.Array, stride: int, conv_shortcut: Optional[Callable]
) -> jax.Array:
  """The NFNet/NF-RegNet block shortcut.

  Strided blocks: 2x2 average pool of the pre-activated input `out`, then the
  1x1 projection; blocks that only change channels: the projection of `out`;
  otherwise the raw input `x` (the variance bookkeeping relies on it).
  """
  if stride > 1:
    return conv_shortcut(avg_pool_2x2(out))
  if conv_shortcut is not None:
    return conv_shortcut(out)
  return x


def residual_merge(
  branch: jax.Array,
  shortcut: jax.Array,
  alpha: float,
  stochdepth_rate: float,
  is_training: bool,
  skip_init: Callable = jnp.zeros,
) -> tuple[jax.Array, jax.Array]:
  """`stochastic_depth(branch) * skip_gain * alpha + shortcut`, and the dropped branch.

  Call inside a block's `__call__`: `skip_gain` becomes that block's parameter.
  SkipInit (De & Smith 2020): the learnable scalar starts at 0, so every
  residual branch starts switched off; alpha sets the variance each branch
  adds (2101.08692 section 4).
  """
  branch = stochastic_depth(branch, stochdepth_rate, is_training)
  skip_gain = hk.get_parameter('skip_gain', (), branch.dtype, init=skip_init)
  return branch * skip_gain * alpha + shortcut, branch


# ---------------------------------------------------------------------------
# Signal bookkeeping (2101.08692 section 4): what every NF family's blocks share.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Everything that fixes one residual block's shapes and signal bookkeeping."""

  in_ch: int
  out_ch: int
  stride: int
  bottleneck_ch: int
  groups: int
  beta: float
  stochdepth_rate: float


@dataclasses.dataclass(frozen=True)
class BlockPlace:
  """Where a block sits, and the two scalars the bookkeeping gives it."""

  stage: int  # 0-based stage
  index_in_stage: int  # 0 for a stage's first (transition) block
  index: int  # 0-based over the whole network
  beta: float  # 1 / expected std of the block's input
  stochdepth_rate: float  # stochdepth_rate * index / number of blocks


def signal_plan(
  depths: Sequence[int], alpha: float, stochdepth_rate: float
) -> Iterator[BlockPlace]:
  """Each block's place, beta and stochastic-depth rate, in order.

  The expected variance of the residual stream starts at 1, grows by alpha^2 with each
  block, and restarts at 1 (+ alpha^2) after each stage's first block, whose shortcut
  sees the normalised input `act(x) * beta`. beta = 1 / expected std, so every residual
  branch sees a unit-variance input. The stochastic-depth rate grows linearly with the
  block's index over the whole network.
  """
  num_blocks = sum(depths)
  expected_std, index = 1.0, 0
  for stage, depth in enumerate(depths):
    for index_in_stage in range(depth):
      yield BlockPlace(
        stage, index_in_stage, index, 1.0 / expected_std, stochdepth_rate * index / num_blocks
      )
      if index_in_stage == 0:
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
      index += 1


def signal_stats(x: jax.Array) -> dict:
  """Signal-propagation statistics of an NHWC activation (2101.08692, fig. 1).

  avg_sq_mean: average over channels of the squared channel mean;
  avg_var: average over channels of the channel variance.
  """
  x = x.astype(jnp.float32)
  return {
    'avg_sq_mean': jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
    'avg_var': jnp.mean(jnp.var(x, axis=(0, 1, 2))),
  }


def apply_blocks(
  blocks: Sequence[Callable],
  x: jax.Array,
  is_training: bool,
  outputs: Optional[dict] = None,
  remat: bool = False,
) -> jax.Array:
  """Runs residual blocks in order; with `outputs`, records their signal statistics.

  Each block returns (output, residual branch). `outputs['block_{i}']` gets the
  output's avg_sq_mean and avg_var and the branch's variance (`res_avg_var`,
  before skip_gain and alpha): the quantities of 2101.08692's signal
  propagation plots.

  With `remat`, each block runs under `hk.remat`: the backward pass recomputes the
  block's activations from its input instead of keeping them, so a deep network keeps
  one activation per block alive rather than every conv's (the same outputs and
  gradients, for about one more forward pass of compute). The blocks are built before
  they are wrapped, so module and parameter names (and the rng draws of stochastic
  depth, which Haiku threads through) do not change.
  """
  for i, block in enumerate(blocks):
    if remat:
      x, branch = hk.remat(lambda h, block=block: block(h, is_training))(x)
    else:
      x, branch = block(x, is_training)
    if outputs is not None:
      outputs[f'block_{i}'] = dict(**signal_stats(x), res_avg_var=signal_stats(branch)['avg_var'])
  return x


def classifier_head(
  features: jax.Array, fc: Callable, drop_rate: float, is_training: bool, outputs: dict
) -> dict:
  """Global average pool -> dropout (training only) -> linear classifier."""
  pool = jnp.mean(features, axis=(1, 2))
  outputs['pool'] = pool
  outputs['logits'] = fc(dropout(pool, drop_rate, is_training))
  return outputs


def check_image_batch(x, module_name: str) -> None:
  """Fail early with the fix, instead of deep inside a convolution."""
  shape = getattr(x, 'shape', None)
  dtype = getattr(x, 'dtype', None)
  if shape is None or len(shape) != 4:
    raise ValueError(
      f'{module_name} expects a batch of NHWC images of rank 4 [batch, height, width, '
      f'channels]; got shape {shape}. Add a batch axis (x[None]) for a single image.'
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'{module_name} expects normalised floating-point images; got dtype {dtype}. '
      'Convert with (x.astype(np.float32) - mean) / std (the data pipeline does this).'
    )
