"""NF-ResNet-only facts (2101.08692, section 4 and appendix; DeepMind's released
nf_resnet.py): parameter trees and counts, optional squeeze-excite, the block.

What every family shares is in test_families.py. Expected shapes, names and
counts are derived here from the paper's text and the released code's layout
(published numbers typed once in tests/helpers.py); the block formula is
re-computed in NumPy (float64).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.models import nf_resnet
from tests import helpers
from tests.helpers import NF_RESNET_DEPTHS

ARCH = helpers.ARCHITECTURES['NFResNet']
TOP = ARCH.root
np_act = helpers.np_scaled('relu')


def expected_tree(depths, num_classes, width=4, se_ratio=0.0):
  """The paper's pre-activation bottleneck ResNet as a parameter tree."""

  def conv(k, cin, cout):
    return {'w': (k, k, cin, cout), 'gain': (cout,), 'bias': (cout,)}

  widths = [int(w * width) for w in helpers.NF_RESNET_WIDTHS]
  in_ch = widths[0] // 4  # 64 at the default width 4
  tree = {f'{TOP}/~/initial_conv': conv(7, 3, in_ch)}
  i = 0
  for depth, out_ch, stage_stride in zip(depths, widths, ARCH.strides, strict=True):
    for b in range(depth):
      n, mid = ARCH.block_path(i), out_ch // 4
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
# Parameter trees and counts.
# ---------------------------------------------------------------------------
def test_resnet50_has_25_557_048_params():
  got = helpers.default_shapes('NFResNet', 'ResNet50')
  assert got == expected_tree(NF_RESNET_DEPTHS['ResNet50'], 1000)
  # A BatchNorm ResNet-50's count (each WS conv's gain and bias replace a BN's
  # scale and offset), plus one skip_gain per block.
  assert helpers.count(got) == helpers.NF_RESNET50_PARAMS == helpers.BN_RESNET50_PARAMS + 16
  # Spot checks typed from the paper's prose.
  assert got[f'{TOP}/~/initial_conv']['w'] == (7, 7, 3, 64)
  assert got[f'{TOP}/~/linear']['w'] == (2048, 1000)
  assert f'{TOP}/~/nf_res_block_0' not in got
  assert not any('squeeze_excite' in m or 'final_conv' in m for m in got)
  with_shortcut = [i for i in range(16) if ARCH.block_path(i) + '/~/conv_shortcut' in got]
  assert with_shortcut == [0, 3, 7, 13]


@pytest.mark.parametrize('variant', sorted(NF_RESNET_DEPTHS))
def test_every_variant_param_tree_follows_the_paper(variant):
  assert helpers.default_shapes('NFResNet', variant) == expected_tree(
    NF_RESNET_DEPTHS[variant], 1000
  )


def test_optional_squeeze_excite():
  # The released API: use_se switches it on, se_ratio (default 0.25) sizes it.
  got = helpers.model_shapes('NFResNet', 'ResNet50', use_se=True)
  assert got == expected_tree(NF_RESNET_DEPTHS['ResNet50'], 1000, se_ratio=0.25)
  assert got[f'{TOP}/~/nf_res_block_15/~/squeeze_excite/~/linear']['w'] == (2048, 512)
  assert helpers.count(got) == nf_resnet.count_flops('ResNet50', use_se=True).params
  half = helpers.model_shapes('NFResNet', 'ResNet50', use_se=True, se_ratio=0.5)
  assert half == expected_tree(NF_RESNET_DEPTHS['ResNet50'], 1000, se_ratio=0.5)
  # se_ratio alone does not switch SE on (it is only the size, as released).
  assert helpers.model_shapes('NFResNet', 'ResNet50', se_ratio=0.5) == expected_tree(
    NF_RESNET_DEPTHS['ResNet50'], 1000
  )


def test_resnet50_macs():
  # A ResNet-50 is commonly quoted at 4.1 GMACs at 224 px (the strided-3x3,
  # "v1.5", layout of the released code); counted exactly, 4.09.
  assert round(nf_resnet.count_flops('ResNet50', 224).macs / 1e9, 2) == 4.09


# ---------------------------------------------------------------------------
# The block, against NumPy.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('stride,in_ch,se_ratio', [(2, 8, 0.25), (1, 8, 0.0), (1, 16, 0.0)])
def test_block_formula(stride, in_ch, se_ratio):
  """out = act(x) * beta; shortcut = strided 1x1 conv of that (no avg-pool) when
  projecting, else x; conv0 -> act -> conv1 (strided) -> act -> conv2; SE;
  return branch * skip_gain * alpha + shortcut."""
  out_ch, mid, beta, alpha = 16, 4, 0.8, 0.3
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 6, 6, in_ch)), jnp.float32)
  p, y, branch = helpers.run_block(
    lambda: nf_resnet.NFResBlock(
      in_ch,
      out_ch,
      mid,
      stride=stride,
      beta=beta,
      alpha=alpha,
      use_se=bool(se_ratio),
      se_ratio=se_ratio or 0.25,
    ),
    x,
    rng,
  )
  x64 = np.asarray(x, np.float64)
  out = np_act(x64) * beta
  projects = stride > 1 or in_ch != out_ch
  assert ('conv_shortcut' in p) == projects
  shortcut = helpers.np_wsconv(out, p['conv_shortcut'], stride) if projects else x64
  h = helpers.np_wsconv(out, p['conv0'])
  h = helpers.np_wsconv(np_act(h), p['conv1'], stride)
  h = helpers.np_wsconv(np_act(h), p['conv2'])
  if se_ratio:
    h = 2 * helpers.np_se(h, p['squeeze_excite/~/linear'], p['squeeze_excite/~/linear_1']) * h
  np.testing.assert_allclose(branch, h, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y, h * 0.7 * alpha + shortcut, rtol=1e-4, atol=1e-4)


def skip_gain_initial_values(make_model, image_size):
  inits = helpers.recorded_inits(make_model, image_size)
  return [
    float(helpers.initial_value(*v)) for (_, param), v in inits.items() if param == 'skip_gain'
  ]


def test_skipinit_gain_option():
  """skip_gain starts at 0, or at whatever `skipinit_gain` gives (the released
  API), in every block of the network."""

  def net(**kw):
    return nf_resnet.NFResNet(10, width=0.25, **kw)

  assert skip_gain_initial_values(net, 32) == [0.0] * 16
  assert skip_gain_initial_values(lambda: net(skipinit_gain=jnp.ones), 32) == [1.0] * 16
