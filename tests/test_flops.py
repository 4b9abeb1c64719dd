"""Tests for nfnet_jax.flops: parameter and MAC counts.

Three independent references: the Haiku parameter tree of the real model
(jax.eval_shape, nothing materialised), the spec's table (paper table 3), and
MACs measured on the real model by intercepting every conv / linear call and
summing output_pixels * weight_size over what was actually executed.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import flops, layers, nfnet

# Spec section 1, "Parameters and FLOPs" (GMACs, 1000 classes).
SPEC_GMACS_TEST = {'F0': 12.38, 'F1': 35.54, 'F2': 62.59, 'F3': 114.76, 'F4': 215.24,
                   'F5': 289.76, 'F6': 377.28, 'F7': 478.78}
SPEC_GMACS_TRAIN = {'F0': 6.98, 'F1': 17.44, 'F2': 33.14, 'F3': 67.94, 'F4': 121.12,
                    'F5': 169.50, 'F6': 228.29, 'F7': 298.48}
SPEC_SIZES = {'F0': (192, 256), 'F1': (224, 320), 'F2': (256, 352), 'F3': (320, 416),
              'F4': (384, 512), 'F5': (416, 544), 'F6': (448, 576), 'F7': (480, 608)}
SPEC_PARAMS_M = {'F0': 71.49, 'F1': 132.63, 'F2': 193.78, 'F3': 254.92, 'F4': 316.07,
                 'F5': 377.21, 'F6': 438.36, 'F7': 499.50, 'F0+': 118.82, 'F1+': 220.36,
                 'F2+': 321.89, 'F3+': 423.42, 'F4+': 524.95, 'F5+': 626.49,
                 'F6+': 728.02, 'F7+': 829.55}


def _measure(variant, image_size, num_classes, **kw):
  """(param count, MACs) of the real Haiku model, traced with eval_shape.

  Every conv (WSConv2D) call contributes out_h * out_w * prod(w.shape) MACs,
  with w the module's own HWIO parameter (I = in / groups), every hk.Linear
  prod(w.shape) (batch 1); elementwise work is not counted, as in the paper.
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
      return nfnet.NFNet(num_classes, variant, **kw)(x, False)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0), x)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert set(out_pixels) == {m for m in params if 'w' in params[m]}
  macs = sum(pixels * int(np.prod(params[m]['w'].shape)) for m, pixels in out_pixels.items())
  return n_params, macs


# (variant, image size, num_classes, model kwargs): odd widths exercise the
# rounding of widths, bottlenecks and SE hidden sizes; odd image sizes the SAME
# padding arithmetic.
CONFIGS = [
    ('F0', 64, 1000, {}),
    ('F1+', 32, 10, {'width': 0.25, 'group_size': 32}),
    ('F0', 40, 10, {'width': 0.125, 'group_size': 16}),
    ('F1', 37, 7, {'width': 0.3, 'group_size': 16, 'se_ratio': 0.25}),
    ('F0+', 50, 3, {'width': 0.2, 'group_size': 8, 'final_conv_mult': 3,
                    'use_two_convs': False}),
    ('F0', 33, 5, {'width': 0.125, 'group_size': 16, 'final_conv_ch': 100}),
]


@pytest.mark.parametrize('variant,size,classes,kw', CONFIGS)
def test_counts_match_real_model(variant, size, classes, kw):
  want_params, want_macs = _measure(variant, size, classes, **kw)
  got = flops.count_flops(variant, size, num_classes=classes, **kw)
  assert got.params == want_params
  assert got.macs == want_macs


@pytest.mark.parametrize('variant', sorted(SPEC_GMACS_TEST))
def test_gmacs_match_spec_table(variant):
  train, test = SPEC_SIZES[variant]
  assert round(flops.count_flops(variant, test).macs / 1e9, 2) == SPEC_GMACS_TEST[variant]
  assert round(flops.count_flops(variant, train).macs / 1e9, 2) == SPEC_GMACS_TRAIN[variant]
  # The default image size is the variant's test size.
  assert flops.count_flops(variant).macs == flops.count_flops(variant, test).macs


@pytest.mark.parametrize('variant', sorted(SPEC_PARAMS_M))
def test_params_match_spec_table(variant):
  assert round(flops.count_flops(variant).params / 1e6, 2) == SPEC_PARAMS_M[variant]


def test_num_classes_changes_only_the_classifier():
  a = flops.count_flops('F0', 256, num_classes=1000)
  b = flops.count_flops('F0', 256, num_classes=10)
  assert a.params - b.params == 990 * 3072 + 990
  assert a.macs - b.macs == 990 * 3072


def test_f0_counts_by_hand():
  """F0 at 256 px, stem + blocks + head written out by hand from the spec."""
  stem_params = (27 * 16 + 32) + (144 * 32 + 64) + (288 * 64 + 128) + (576 * 128 + 256)
  stem_macs = 128**2 * 27 * 16 + 128**2 * 144 * 32 + 128**2 * 288 * 64 + 64**2 * 576 * 128
  head_params = (1536 * 3072 + 2 * 3072) + (3072 * 1000 + 1000)
  head_macs = 8**2 * 1536 * 3072 + 3072 * 1000     # final conv at 256 / 32 = 8 px
  total = flops.count_flops('F0', 256)
  # The blocks alone, by hand: stage s, block b at resolution r_s.
  block_params = block_macs = 0
  in_ch, res = 128, 64
  for depth, out_ch, stride in zip([1, 2, 6, 3], [256, 512, 1536, 1536], [1, 2, 2, 2]):
    mid = (out_ch // 2) // 128 * 128
    for b in range(depth):
      s = stride if b == 0 else 1
      out_res = res // s
      convs = [(res, in_ch * mid), (out_res, 9 * 128 * mid), (out_res, 9 * 128 * mid),
               (out_res, mid * out_ch)]
      channels = [mid, mid, mid, out_ch]
      if s > 1 or in_ch != out_ch:
        convs.append((out_res, in_ch * out_ch))
        channels.append(out_ch)
      for (r, w), c in zip(convs, channels):
        block_params += w + 2 * c
        block_macs += r * r * w
      hidden = out_ch // 2
      block_params += out_ch * hidden + hidden + hidden * out_ch + out_ch + 1
      block_macs += 2 * out_ch * hidden
      in_ch, res = out_ch, out_res
  assert total.params == stem_params + block_params + head_params
  assert total.macs == stem_macs + block_macs + head_macs
