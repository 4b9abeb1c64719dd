"""Shared test helpers: published reference numbers, NumPy references, model tracing.

Everything a test compares the models with is typed here once, from the papers
(Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition
Without Normalization", arXiv 2102.06171; Brock, De, Smith 2021, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets", arXiv
2101.08692) and DeepMind's released Haiku code (deepmind-research/nfnets: base.py,
nfnet.py, nf_resnet.py, nf_regnet.py, experiment.py), never read from nfnet_jax.
The NumPy references re-compute the layers in float64 from their definitions.
"""

import dataclasses
import functools
import math
from typing import Callable, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from nfnet_jax.models import FAMILIES, layers

# ---------------------------------------------------------------------------
# Published numbers.
# ---------------------------------------------------------------------------
# The tables below keep the papers' row layout.
# fmt: off
# gamma = 1 / std(f(z)), z ~ N(0, 1): the constants of base.py's `nonlinearities`
# (2101.08692, section 4.2), which the released weights were trained with.
GAMMAS = {
  'gelu': 1.7015043497085571, 'relu': 1.7139588594436646,
  'silu': 1.7881293296813965, 'elu': 1.2716004848480225,
  'celu': 1.270926833152771, 'leaky_relu': 1.70590341091156,
  'relu6': 1.7131484746932983, 'selu': 1.0008515119552612,
  'sigmoid': 4.803835391998291, 'softplus': 1.9203323125839233,
  'tanh': 1.5939117670059204, 'soft_sign': 2.338853120803833,
  'log_sigmoid': 1.9193484783172607, 'glu': 1.8484294414520264,
  'log_softmax': 1.0002083778381348, 'identity': 1.0,
}

# NFNets: 2102.06171 table 1 (F0..F6) and base.py's `nfnet_params` (F7 and the
# wider '+' variants, whose depths are the plain ones').
NFNET_DEPTHS = {
  'F0': [1, 2, 6, 3], 'F1': [2, 4, 12, 6], 'F2': [3, 6, 18, 9], 'F3': [4, 8, 24, 12],
  'F4': [5, 10, 30, 15], 'F5': [6, 12, 36, 18], 'F6': [7, 14, 42, 21],
  'F7': [8, 16, 48, 24],
}
NFNET_WIDTHS = [256, 512, 1536, 1536]
NFNET_PLUS_WIDTHS = [384, 768, 2048, 2048]
NFNET_SIZES = {  # train size, test size, RandAugment magnitude (4 layers), dropout
  'F0': (192, 256, 5, 0.2), 'F1': (224, 320, 10, 0.3), 'F2': (256, 352, 10, 0.4),
  'F3': (320, 416, 15, 0.4), 'F4': (384, 512, 15, 0.5), 'F5': (416, 544, 15, 0.5),
  'F6': (448, 576, 15, 0.5), 'F7': (480, 608, 15, 0.5),
}
# 2102.06171 table 3: parameters (millions) and GMACs (1000 classes).
NFNET_PARAMS_M = {
  'F0': 71.49, 'F1': 132.63, 'F2': 193.78, 'F3': 254.92, 'F4': 316.07, 'F5': 377.21,
  'F6': 438.36, 'F7': 499.50,
  'F0+': 118.82, 'F1+': 220.36, 'F2+': 321.89, 'F3+': 423.42, 'F4+': 524.95,
  'F5+': 626.49, 'F6+': 728.02, 'F7+': 829.55,
}
NFNET_GMACS_TEST = {'F0': 12.38, 'F1': 35.54, 'F2': 62.59, 'F3': 114.76, 'F4': 215.24,
                    'F5': 289.76, 'F6': 377.28, 'F7': 478.78}
NFNET_GMACS_TRAIN = {'F0': 6.98, 'F1': 17.44, 'F2': 33.14, 'F3': 67.94, 'F4': 121.12,
                     'F5': 169.50, 'F6': 228.29, 'F7': 298.48}
# F0's per-block betas (1 / expected std, 2101.08692 section 4), to 4 decimals.
F0_BETAS = [1.0, .9806, .9806, .9623, .9806, .9623, .9449, .9285, .9129, .8980,
            .9806, .9623]
# DeepMind's experiment.py trains NFNets with this stochastic-depth rate; the
# NFNet class's own default (nfnet.py) is 0.1.
NFNET_TRAIN_STOCHDEPTH = 0.25

# NF-ResNets: nf_resnet.py's `variant_dict` (2101.08692, appendix).
NF_RESNET_DEPTHS = {
  'ResNet50': [3, 4, 6, 3], 'ResNet101': [3, 4, 23, 3], 'ResNet152': [3, 8, 36, 3],
  'ResNet200': [3, 24, 36, 3], 'ResNet288': [24] * 4, 'ResNet600': [50] * 4,
}
NF_RESNET_WIDTHS = [64, 128, 256, 512]   # x the width multiplier, 4 by default
# NF-ResNet-50 at 1000 classes: a BatchNorm ResNet-50's 25,557,032 (each WS conv's
# gain and bias take the place of a BN's scale and offset) plus 16 skip gains.
NF_RESNET50_PARAMS = 25_557_048
BN_RESNET50_PARAMS = 25_557_032

# NF-RegNets: base.py's `nf_regnet_params` (2101.08692, appendix).
NF_REGNET_WIDTHS = {
  'B0': [48, 104, 208, 440], 'B1': [48, 104, 208, 440], 'B2': [56, 112, 232, 488],
  'B3': [56, 128, 248, 528], 'B4': [64, 144, 288, 616], 'B5': [80, 168, 336, 704],
  'B6': [88, 184, 376, 792], 'B7': [96, 208, 416, 880], 'B8': [104, 232, 456, 968],
}
NF_REGNET_DEPTHS = {
  'B0': [1, 3, 6, 6], 'B1': [2, 4, 7, 7], 'B2': [2, 4, 8, 8], 'B3': [2, 5, 9, 9],
  'B4': [2, 6, 11, 11], 'B5': [3, 7, 14, 14], 'B6': [3, 8, 16, 16],
  'B7': [4, 10, 19, 19], 'B8': [4, 11, 22, 22],
}
NF_REGNET_SIZES = {'B0': (192, 224), 'B1': (224, 256), 'B2': (240, 272),
                   'B3': (288, 320), 'B4': (320, 384), 'B5': (384, 456),
                   'B6': (448, 528), 'B7': (512, 600), 'B8': (600, 672)}
NF_REGNET_DROPOUT = {'B0': 0.2, 'B1': 0.2, 'B2': 0.3, 'B3': 0.3, 'B4': 0.4, 'B5': 0.4,
                     'B6': 0.5, 'B7': 0.5, 'B8': 0.5}
# fmt: on
# The released NF_RegNet('B0') at 1000 classes.
NF_REGNET_B0_PARAMS = 8_595_372


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One family as published: enough to predict its shapes without nfnet_jax.

  Attributes:
    root: the top-level Haiku module of the released parameter trees.
    block: the residual blocks' module name (`<root>/~/<block>`, `<block>_1`, ...).
    depths: variant -> blocks per stage.
    widths: variant -> stage output channels at width multiplier 1.
    sizes: variant -> (train, test) resolution.
    dropout: variant -> the classifier's dropout rate (0 where none is published).
    stem_channels: stem output channels as a function of the width multiplier and
      the first stage's channels (already multiplied).
    stem_stride: the stride before the first block.
    strides: the stride of each stage's first block (the others have stride 1).
    head_channels: the pooled features' channels from the last stage's.
    final_conv: a 1x1 `final_conv` comes between the last block and the pooling.
    default_width: the released class's width multiplier.
    activation: the released default nonlinearity (a key of GAMMAS).
    fc_std: the classifier weights' initial standard deviation.
    pooled_shortcut: strided shortcuts average-pool before the 1x1 conv (else the
      conv itself is strided).
  """

  root: str
  block: str
  depths: Mapping[str, Sequence[int]]
  widths: Mapping[str, Sequence[int]]
  sizes: Mapping[str, tuple[int, int]]
  dropout: Mapping[str, float]
  stem_channels: Callable[[float, int], int]
  stem_stride: int
  strides: Sequence[int]
  head_channels: Callable[[int], int]
  final_conv: bool
  default_width: float
  activation: str
  fc_std: float
  pooled_shortcut: bool

  def block_path(self, i: int) -> str:
    return f'{self.root}/~/{self.block}' + ('' if i == 0 else f'_{i}')


def _nfnet_table(column):
  return {f'{k}{plus}': column(k, plus) for k in NFNET_DEPTHS for plus in ('', '+')}


# Keyed by the registry's family names (config.model.name).
# fmt: off
ARCHITECTURES = {
  'NFNet': Architecture(
    root='NFNet', block='nf_block',
    depths=_nfnet_table(lambda k, plus: NFNET_DEPTHS[k]),
    widths=_nfnet_table(lambda k, plus: NFNET_PLUS_WIDTHS if plus else NFNET_WIDTHS),
    sizes=_nfnet_table(lambda k, plus: NFNET_SIZES[k][:2]),
    dropout=_nfnet_table(lambda k, plus: NFNET_SIZES[k][3]),
    stem_channels=lambda width, first: first // 2, stem_stride=4, strides=[1, 2, 2, 2],
    head_channels=lambda last: 2 * last, final_conv=True, default_width=1.0,
    activation='gelu', fc_std=0.01, pooled_shortcut=True),
  'NFResNet': Architecture(
    root='NF_ResNet', block='nf_res_block', depths=NF_RESNET_DEPTHS,
    widths={v: NF_RESNET_WIDTHS for v in NF_RESNET_DEPTHS},
    sizes={v: (224, 224) for v in NF_RESNET_DEPTHS},   # 224 px ImageNet (2101.08692)
    dropout={v: 0.0 for v in NF_RESNET_DEPTHS},
    stem_channels=lambda width, first: int(16 * width), stem_stride=4, strides=[1, 2, 2, 2],
    head_channels=lambda last: last, final_conv=False, default_width=4,
    activation='relu', fc_std=0.01, pooled_shortcut=False),
  'NFRegNet': Architecture(
    root='NF_RegNet', block='nf_block', depths=NF_REGNET_DEPTHS, widths=NF_REGNET_WIDTHS,
    sizes=NF_REGNET_SIZES, dropout=NF_REGNET_DROPOUT,
    stem_channels=lambda width, first: first, stem_stride=2, strides=[2, 2, 2, 2],
    head_channels=lambda last: 1280 * last // 440, final_conv=True, default_width=0.75,
    activation='silu', fc_std=0.0, pooled_shortcut=True),
}
# fmt: on

# Narrow models for the forward-pass tests, per family: (variant, model arguments,
# image side, batch). Narrow, so that a forward pass compiles in a second or two;
# 64 px, so that every stage but the last has at least 2 x 2 pixels to take
# statistics over.
NARROW = {
  'NFNet': ('F0', dict(width=0.25, group_size=32), 64, 16),  # stages 64/128/384/384
  'NFResNet': ('ResNet50', dict(width=0.25), 64, 16),  # stages 16/32/64/128
  'NFRegNet': ('B0', dict(width=0.25), 64, 16),  # stages 12/26/52/110
}


# The cheapest `nfnet_jax.benchmark` run: an F0 at 1/16 width evaluating one 32 px image,
# one timed step (F0's group width of 128 still builds: one group per conv).
TINY_BENCHMARK_FLAGS = (
  '--variant=F0',
  '--width=0.0625',
  '--mode=eval',
  '--image-size=32',
  '--batch-per-device=1',
  '--num-devices=1',
  '--dtype=float32',
  '--steps=1',
  '--warmup=1',
)


def recurrence_betas(depths: Sequence[int], alpha: float = 0.2) -> list[float]:
  """beta = 1 / expected std (2101.08692, section 4): the expected std starts at
  1, is reset to 1 after each stage's first block, and otherwise grows as
  sqrt(std^2 + alpha^2) with every block."""
  betas, expected_std = [], 1.0
  for depth in depths:
    for i in range(depth):
      betas.append(1.0 / expected_std)
      if i == 0:
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
  return betas


# ---------------------------------------------------------------------------
# NumPy references (float64).
# ---------------------------------------------------------------------------
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def np_gelu_tanh(x):
  # The authors call jax.nn.gelu with its default, the tanh approximation.
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# Elementwise f, written from the textbook definitions (JAX defaults: leaky_relu
# slope 0.01, celu alpha 1). Vectorised, so usable both in quadrature and on arrays.
NP_ACTIVATIONS = {
  'gelu': np_gelu_tanh,
  'relu': lambda x: np.maximum(x, 0.0),
  'silu': lambda x: x * special.expit(x),
  'elu': lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
  'celu': lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
  'leaky_relu': lambda x: np.where(x > 0, x, 0.01 * x),
  'relu6': lambda x: np.clip(x, 0.0, 6.0),
  'selu': lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0.0))),
  'sigmoid': special.expit,
  'softplus': lambda x: np.logaddexp(0.0, x),
  'tanh': np.tanh,
  'soft_sign': lambda x: x / (1.0 + np.abs(x)),
  'log_sigmoid': lambda x: -np.logaddexp(0.0, -x),
  'identity': lambda x: x,
}


def np_scaled(name: str) -> Callable[[np.ndarray], np.ndarray]:
  """x -> f(x) * gamma_f in float64, for an elementwise activation."""
  f, gamma = NP_ACTIVATIONS[name], GAMMAS[name]
  return lambda x: f(np.asarray(x, np.float64)) * gamma


def np_standardize(w, gain, eps=1e-4):
  """W_hat = (W - mean) * gain / sqrt(max(var * fan_in, eps)), over H, W, I."""
  w = np.asarray(w, np.float64)
  fan_in = w.shape[0] * w.shape[1] * w.shape[2]
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
  return (w - mean) * np.asarray(gain, np.float64) / np.sqrt(np.maximum(var * fan_in, eps))


def np_conv(x, w, stride=1, groups=1):
  """NHWC x HWIO convolution with TF 'SAME' padding, grouped; float64.

  One matrix product per kernel offset and group, over the strided input patches.
  """
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  n, h, wd, c = x.shape
  kh, kw, cin_g, cout = w.shape
  assert cin_g * groups == c and cout % groups == 0
  oh, ow = -(-h // stride), -(-wd // stride)
  ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - wd, 0)
  xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = np.zeros((n, oh, ow, cout))
  cout_g = cout // groups
  for g in range(groups):
    xg = xp[..., g * cin_g : (g + 1) * cin_g]
    wg = w[..., g * cout_g : (g + 1) * cout_g]
    for i in range(kh):
      for j in range(kw):
        patch = xg[
          :, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride
        ]
        out[..., g * cout_g : (g + 1) * cout_g] += patch @ wg[i, j]
  return out


def np_wsconv(x, p, stride=1, groups=1):
  """A WSConv2D's function from its parameters {'w', 'gain', 'bias'}."""
  return np_conv(x, np_standardize(p['w'], p['gain']), stride, groups) + np.asarray(
    p['bias'], np.float64
  )


def np_se(x, p0, p1):
  """Squeeze-excite gate: mean -> linear -> plain ReLU -> linear -> sigmoid."""
  h = np.asarray(x, np.float64).mean(axis=(1, 2))
  h = np.maximum(h @ np.asarray(p0['w'], np.float64) + np.asarray(p0['b']), 0)
  h = h @ np.asarray(p1['w'], np.float64) + np.asarray(p1['b'])
  return special.expit(h)[:, None, None, :]


def np_avg_pool_2x2(x):
  """2x2 windows, stride 2, SAME (padding at the end), padding not counted."""
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  out = np.zeros((b, -(-h // 2), -(-w // 2), c))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      out[:, i, j, :] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].mean(axis=(1, 2))
  return out


def assert_close(got, want, rtol=2e-4):
  """allclose, with the absolute tolerance relative to the largest wanted entry."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30))


# ---------------------------------------------------------------------------
# Parameters filled by NumPy (jax.random is slow to compile on CPU).
# ---------------------------------------------------------------------------
def _shape(s):
  return tuple(getattr(s, 'shape', s))


def _filled(shapes, value):
  """{module: {name: value(module, name, shape)}} as float32, for `shapes` of
  {module: {name: shape or ShapeDtypeStruct}} (f.init's tree, from eval_shape)."""
  return {
    mod: {name: jnp.asarray(value(mod, name, _shape(s)), jnp.float32) for name, s in p.items()}
    for mod, p in shapes.items()
  }


def random_params(shapes, rng, skip_gain=0.7):
  """Parameters with values that make a wrong wiring show: weights N(0, 1/fan_in);
  every vector (gain, bias, b) of magnitude U(0.5, 1.5) and random sign, so that a
  forgotten gain or bias, or a ReLU that clips nothing, shows; skip_gain fixed."""

  def value(unused_mod, name, s):
    if name == 'skip_gain':
      return np.full(s, skip_gain)
    if len(s) == 1:
      return rng.uniform(0.5, 1.5, s) * rng.choice([-1.0, 1.0], s)
    return rng.standard_normal(s) / np.sqrt(np.prod(s[:-1]))

  return _filled(shapes, value)


def init_like_params(shapes, rng, classifier, fc_std=0.01):
  """Parameters distributed as at initialisation: weights N(0, 1/fan_in) (the
  classifier's N(0, fc_std^2)), gains 1, biases and skip gains 0 (SkipInit)."""

  def value(mod, name, s):
    if name == 'w':
      return rng.standard_normal(s) * (
        fc_std if mod == classifier else 1 / np.sqrt(np.prod(s[:-1]))
      )
    return np.ones(s) if name == 'gain' else np.zeros(s)  # bias, b, skip_gain

  return _filled(shapes, value)


def with_skip_gain(params, value):
  return {
    m: ({**p, 'skip_gain': jnp.float32(value)} if 'skip_gain' in p else p)
    for m, p in params.items()
  }


# ---------------------------------------------------------------------------
# Tracing and compiling models.
# ---------------------------------------------------------------------------
def compile_lowered(fn, *args):
  """jit at XLA backend optimisation level 0: same function, faster compile."""
  return jax.jit(fn).lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})


def zeros_creator(next_creator, shape, dtype, init, context):
  return next_creator(shape, dtype, jnp.zeros)


def traced_shapes(make_model, image_size=32):
  """{module: {param: shape}} of `make_model()` via jax.eval_shape, never
  materialised (zero initializers and the native conv lowering only make the
  tracing faster; neither changes a shape)."""

  def fn(x):
    with hk.custom_creator(zeros_creator):
      return make_model()(x, False)

  with layers.conv_impl('native'):
    tree = jax.eval_shape(
      hk.transform(fn).init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
    )
  return {m: {k: tuple(v.shape) for k, v in p.items()} for m, p in tree.items()}


@functools.lru_cache(maxsize=None)
def _model_shapes(family_name, variant, num_classes, image_size, kwargs):
  model = FAMILIES[family_name].model
  return traced_shapes(lambda: model(num_classes, variant=variant, **dict(kwargs)), image_size)


def model_shapes(family_name, variant, num_classes=1000, image_size=32, **kwargs):
  """traced_shapes of a family's model, cached for the session: the deep variants
  take seconds to trace, and several test modules look at the same trees."""
  shapes = _model_shapes(
    family_name, variant, num_classes, image_size, tuple(sorted(kwargs.items()))
  )
  return {m: dict(p) for m, p in shapes.items()}


def default_shapes(family_name, variant, num_classes=1000):
  """The parameter shapes of a variant built with its family's default arguments."""
  return model_shapes(family_name, variant, num_classes, **FAMILIES[family_name].defaults)


def count(shapes):
  return sum(int(np.prod(s)) for p in shapes.values() for s in p.values())


def measure_cost(make_model, image_size):
  """(parameters, MACs) of one image's forward pass of the real model, traced.

  Every WSConv2D call contributes out_h * out_w * prod(w.shape) MACs, with w the
  module's own HWIO parameter (I = in / groups), every hk.Linear prod(w.shape)
  (batch 1); elementwise work is not counted, as in 2102.06171 table 3.
  """
  out_pixels = {}

  def interceptor(method, args, kwargs, context):
    out = method(*args, **kwargs)
    if context.method_name == '__call__':
      if isinstance(context.module, layers.WSConv2D):
        out_pixels[context.module.module_name] = out.shape[1] * out.shape[2]
      elif isinstance(context.module, hk.Linear):
        out_pixels[context.module.module_name] = 1
    return out

  def fn(x):
    with hk.intercept_methods(interceptor):
      return make_model()(x, False)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  with layers.conv_impl('native'):
    params = jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0), x)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert set(out_pixels) == {m for m in params if 'w' in params[m]}
  macs = sum(pixels * int(np.prod(params[m]['w'].shape)) for m, pixels in out_pixels.items())
  return n_params, macs


def assert_lowerings_agree(apply, params, x, rng):
  """apply(params, x) and its gradients, under the 'native' and the 'dense' conv
  lowering: the same function, to float32 rounding. Returns both outputs."""
  cot = jnp.asarray(rng.standard_normal(jax.eval_shape(apply, params, x).shape), jnp.float32)

  def loss(p, xx):
    out = apply(p, xx)
    return jnp.sum(out * cot), out

  results = {}
  for impl in ('native', 'dense'):
    with layers.conv_impl(impl):
      # A fresh trace per impl: the lowering is chosen while tracing.
      step = compile_lowered(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), params, x)
    (_, out), (gp, gx) = step(params, x)
    results[impl] = (out, gp, gx)
  (o_n, gp_n, gx_n), (o_d, gp_d, gx_d) = results['native'], results['dense']
  # float32 sums in a different order: ~1e-6 relative differences, compared with
  # each tensor's largest entry.
  assert_close(o_d, o_n, rtol=1e-5)
  assert_close(gx_d, gx_n, rtol=1e-5)
  assert gp_d.keys() == gp_n.keys()
  for mod in gp_n:
    for name in gp_n[mod]:
      assert_close(gp_d[mod][name], gp_n[mod][name], rtol=1e-5)
  return o_n, o_d


def recorded_inits(make_model, image_size=32):
  """{(module, parameter): (shape, dtype, initializer)} of `make_model()`, traced
  only (helpers.initial_value evaluates an initializer outside the trace)."""
  inits = {}

  def creator(next_creator, shape, dtype, init, context):
    inits[context.module_name, context.name] = (tuple(shape), dtype, init)
    return next_creator(shape, dtype, jnp.zeros)

  def fn(x):
    with hk.custom_creator(creator):
      return make_model()(x, False)

  with layers.conv_impl('native'):
    jax.eval_shape(
      hk.transform(fn).init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
    )
  return inits


def initial_value(shape, dtype, init, seed=0):
  """What `init` makes, in a Haiku context (initializers may draw random keys)."""
  return np.asarray(
    hk.transform(lambda: init(shape, dtype)).apply({}, jax.random.key(seed, impl='rbg'))
  )


def relative_names(params):
  """A single block's parameters keyed by path below the block ('self' for its own)."""
  return {m.split('/~/', 1)[1] if '/~/' in m else 'self': v for m, v in params.items()}


def run_block(make_block, x, rng, skip_gain=0.7):
  """Builds `make_block()` on x (eval mode), fills it with random_params, and
  returns (params keyed by relative_names, output, residual branch)."""
  f = hk.without_apply_rng(hk.transform(lambda x: make_block()(x, False)))
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  params = random_params(shapes, rng, skip_gain)
  y, branch = jax.jit(f.apply)(params, x)
  return relative_names(params), y, branch
