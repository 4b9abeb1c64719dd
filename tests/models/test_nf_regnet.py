"""NF-RegNet-only facts (2101.08692, section 5 and appendix; DeepMind's released
nf_regnet.py): parameter trees and counts, the reading they pin down, the block.

What every family shares is in test_families.py. Expected shapes, names and
counts are derived here from the released code's layout (published numbers typed
once in tests/helpers.py); the block formula is re-computed in NumPy (float64).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.models import nf_regnet
from tests import helpers
from tests.helpers import NF_REGNET_DEPTHS, NF_REGNET_WIDTHS

ARCH = helpers.ARCHITECTURES['NFRegNet']
TOP = ARCH.root
np_act = helpers.np_scaled('silu')


def expected_tree(
  variant, num_classes, width=0.75, se_from='bottleneck', round_up=False, first_shortcut=True
):
  """The released layout as a parameter tree. The keyword arguments select
  alternative readings, to show that only the released one hits its count."""

  def conv(k, cin, cout, groups=1):
    return {'w': (k, k, cin // groups, cout), 'gain': (cout,), 'bias': (cout,)}

  widths = [int(w * width) for w in NF_REGNET_WIDTHS[variant]]
  in_ch = widths[0]
  tree = {f'{TOP}/~/initial_conv': conv(3, 3, in_ch)}
  i = 0
  for depth, out_ch in zip(NF_REGNET_DEPTHS[variant], widths, strict=True):
    for b in range(depth):
      n = ARCH.block_path(i)
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
      if (b == 0 or in_ch != out_ch) and (first_shortcut or i > 0):  # stride 2 or new width
        tree[n + '/~/conv_shortcut'] = conv(1, in_ch, out_ch)
      in_ch, i = out_ch, i + 1
  final = int(1280 * in_ch / 440)
  tree[f'{TOP}/~/final_conv'] = conv(1, in_ch, final)
  tree[f'{TOP}/~/linear'] = {'w': (final, num_classes), 'b': (num_classes,)}
  return tree


# ---------------------------------------------------------------------------
# Parameter trees and counts.
# ---------------------------------------------------------------------------
def test_b0_has_8_595_372_params():
  got = helpers.default_shapes('NFRegNet', 'B0')
  assert got == expected_tree('B0', 1000)
  assert helpers.count(got) == helpers.NF_REGNET_B0_PARAMS
  # Spot checks typed from the released code's arithmetic.
  assert got[f'{TOP}/~/initial_conv']['w'] == (3, 3, 3, 36)  # int(48 * 0.75)
  first = ARCH.block_path(0)
  assert f'{TOP}/~/nf_block_0' not in got
  assert got[first + '/~/conv0']['w'] == (1, 1, 36, 32)  # 36 -> 4 groups of 8
  assert got[first + '/~/conv1']['w'] == (3, 3, 8, 32)
  assert got[first + '/~/squeeze_excite/~/linear']['w'] == (32, 16)
  assert got[first + '/~/conv_shortcut']['w'] == (1, 1, 36, 36)  # stride 2, same width
  assert got[f'{TOP}/~/nf_block_1/~/conv0']['w'] == (1, 1, 36, 80)  # 81 -> 80
  assert got[f'{TOP}/~/final_conv']['w'] == (1, 1, 330, 960)
  assert got[f'{TOP}/~/linear']['w'] == (960, 1000)
  with_shortcut = [i for i in range(16) if ARCH.block_path(i) + '/~/conv_shortcut' in got]
  assert with_shortcut == [0, 1, 4, 10]


@pytest.mark.parametrize(
  'reading,n',
  [
    (dict(), helpers.NF_REGNET_B0_PARAMS),
    (dict(first_shortcut=False), 8_594_004),
    (dict(round_up=True), 8_756_700),
    (dict(se_from='input'), 6_662_774),
    (dict(se_from='output'), 6_739_241),
  ],
)
def test_only_the_released_reading_hits_the_count(reading, n):
  """Pure arithmetic: the details the count pins down (SE hidden width from the
  bottleneck, groups rounded down, a shortcut on the very first block)."""
  assert helpers.count(expected_tree('B0', 1000, **reading)) == n


@pytest.mark.parametrize('variant', sorted(NF_REGNET_WIDTHS))
def test_every_variant_param_tree_follows_the_released_layout(variant):
  assert helpers.default_shapes('NFRegNet', variant) == expected_tree(variant, 1000)


# ---------------------------------------------------------------------------
# The block, against NumPy.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('stride,in_ch', [(2, 16), (1, 16), (1, 8)])
def test_block_formula(stride, in_ch):
  """out = act(x) * beta; shortcut = 2x2 avg-pool then 1x1 conv when strided, the
  1x1 conv when only channels change, else x; conv0 -> act -> grouped conv1
  (strided) -> 2 * se * out -> act -> conv2; return branch * skip_gain * alpha +
  shortcut (the released nf_regnet.py's NFBlock)."""
  out_ch, mid, groups, beta, alpha = 16, 24, 3, 0.8, 0.3
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 6, 6, in_ch)), jnp.float32)
  p, y, branch = helpers.run_block(
    lambda: nf_regnet.NFRegNetBlock(
      in_ch, out_ch, mid, groups, stride=stride, beta=beta, alpha=alpha
    ),
    x,
    rng,
  )
  assert p['squeeze_excite/~/linear']['w'].shape == (mid, mid // 2)
  x64 = np.asarray(x, np.float64)
  out = np_act(x64) * beta
  if stride > 1:
    shortcut = helpers.np_wsconv(helpers.np_avg_pool_2x2(out), p['conv_shortcut'])
  elif in_ch != out_ch:
    shortcut = helpers.np_wsconv(out, p['conv_shortcut'])
  else:
    assert 'conv_shortcut' not in p
    shortcut = x64
  h = helpers.np_wsconv(out, p['conv0'])
  h = helpers.np_wsconv(np_act(h), p['conv1'], stride, groups)
  h = 2 * helpers.np_se(h, p['squeeze_excite/~/linear'], p['squeeze_excite/~/linear_1']) * h
  h = helpers.np_wsconv(np_act(h), p['conv2'])
  np.testing.assert_allclose(branch, h, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y, h * 0.7 * alpha + shortcut, rtol=1e-4, atol=1e-4)
