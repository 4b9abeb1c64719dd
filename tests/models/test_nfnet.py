"""NFNet-only facts (2102.06171): the F-series table, parameter trees, counts, the block.

What every family shares (building every variant, dropout, stochastic depth,
signal propagation, ...) is in test_families.py. Expected structures, shapes,
betas and counts are derived here from the paper's text and tables (typed once in
tests/helpers.py); the forward-pass checks compare the narrow F0 of
tests/models/conftest.py, module by module (captured with Haiku method
interceptors), with NumPy re-computations of the block formula.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.models import nfnet
from tests import helpers
from tests.helpers import (
  NFNET_DEPTHS,
  NFNET_PARAMS_M,
  NFNET_PLUS_WIDTHS,
  NFNET_SIZES,
  NFNET_WIDTHS,
  assert_close,
)

ARCH = helpers.ARCHITECTURES['NFNet']
TOP = ARCH.root
STRIDES = ARCH.strides
ALPHA = 0.2
np_act = helpers.np_scaled('gelu')


def paper_blocks(depths, widths, width=1.0, group_size=128):
  """Per block (in, out, stride, bottleneck, groups, projection?), from the paper:
  the bottleneck is half the output channels, in whole groups of group_size."""
  widths = [int(w * width) for w in widths]
  in_ch, blocks = widths[0] // 2, []
  for depth, out_ch, stage_stride in zip(depths, widths, STRIDES, strict=True):
    for i in range(depth):
      stride = stage_stride if i == 0 else 1
      groups = int(out_ch * 0.5) // group_size
      assert groups >= 1, 'test configs keep whole groups'
      blocks.append(
        dict(
          in_ch=in_ch,
          out_ch=out_ch,
          stride=stride,
          mid=groups * group_size,
          groups=groups,
          proj=stride > 1 or in_ch != out_ch,
        )
      )
      in_ch = out_ch
  return blocks


def expected_param_shapes(depths, widths, num_classes, width=1.0, group_size=128):
  """{module path: {param: shape}} for an NFNet, built from the paper's text."""
  blocks = paper_blocks(depths, widths, width, group_size)
  stem_ch = int(widths[0] * width) // 2

  def conv(k, cin, cout):
    return {'w': (k, k, cin, cout), 'gain': (cout,), 'bias': (cout,)}

  tree = {}
  for i, (cin, cout) in enumerate([(3, 16), (16, 32), (32, 64), (64, stem_ch)]):
    tree[f'{TOP}/~/stem_conv{i}'] = conv(3, cin, cout)
  for i, b in enumerate(blocks):
    n, mid, g = ARCH.block_path(i), b['mid'], b['groups']
    tree[n] = {'skip_gain': ()}
    tree[n + '/~/conv0'] = conv(1, b['in_ch'], mid)
    tree[n + '/~/conv1'] = conv(3, mid // g, mid)
    tree[n + '/~/conv1b'] = conv(3, mid // g, mid)
    tree[n + '/~/conv2'] = conv(1, mid, b['out_ch'])
    if b['proj']:
      tree[n + '/~/conv_shortcut'] = conv(1, b['in_ch'], b['out_ch'])
    hidden = max(1, int(b['out_ch'] * 0.5))
    tree[n + '/~/squeeze_excite/~/linear'] = {'w': (b['out_ch'], hidden), 'b': (hidden,)}
    tree[n + '/~/squeeze_excite/~/linear_1'] = {'w': (hidden, b['out_ch']), 'b': (b['out_ch'],)}
  last = blocks[-1]['out_ch']
  tree[f'{TOP}/~/final_conv'] = conv(1, last, 2 * last)
  tree[f'{TOP}/~/linear'] = {'w': (2 * last, num_classes), 'b': (num_classes,)}
  return tree


def published_widths(variant):
  return NFNET_PLUS_WIDTHS if variant.endswith('+') else NFNET_WIDTHS


# ---------------------------------------------------------------------------
# The variant table.
# ---------------------------------------------------------------------------
def test_variant_table_matches_the_paper():
  assert set(nfnet.NFNET_VARIANTS) == set(NFNET_PARAMS_M)
  for k in range(8):
    train, test, mag, drop = NFNET_SIZES[f'F{k}']
    for suffix, widths in (('', NFNET_WIDTHS), ('+', NFNET_PLUS_WIDTHS)):
      v = nfnet.NFNET_VARIANTS[f'F{k}{suffix}']
      assert list(v['width']) == widths
      assert list(v['depth']) == NFNET_DEPTHS[f'F{k}']
      assert (v['train_imsize'], v['test_imsize']) == (train, test)
      assert (v['randaug_layers'], v['randaug_magnitude']) == (4, mag)
      assert v['drop_rate'] == drop


# ---------------------------------------------------------------------------
# Parameter trees and counts.
# ---------------------------------------------------------------------------
def test_f0_param_tree_names_and_shapes():
  got = helpers.default_shapes('NFNet', 'F0')
  want = expected_param_shapes(NFNET_DEPTHS['F0'], NFNET_WIDTHS, 1000)
  assert sorted(got) == sorted(want)
  for mod in want:
    assert got[mod] == want[mod], mod
  # Spot checks typed straight from the paper's prose.
  assert f'{TOP}/~/nf_block_0' not in got
  assert got[f'{TOP}/~/linear']['w'] == (3072, 1000)
  assert got[f'{TOP}/~/final_conv']['w'] == (1, 1, 1536, 3072)
  assert got[f'{TOP}/~/stem_conv3']['w'] == (3, 3, 64, 128)
  assert got[f'{TOP}/~/nf_block_3/~/conv1']['w'] == (3, 3, 128, 768)  # 6 groups of 128
  assert got[f'{TOP}/~/nf_block']['skip_gain'] == ()


@pytest.mark.parametrize('variant', list(NFNET_PARAMS_M))
def test_every_variant_param_tree_follows_the_paper(variant):
  want = expected_param_shapes(NFNET_DEPTHS[variant.rstrip('+')], published_widths(variant), 1000)
  assert helpers.default_shapes('NFNet', variant) == want


def test_f0_projection_blocks():
  # Projection only where stride > 1 or channels change: the first block of each
  # stage (block 0: 128 stem channels -> 256).
  got = helpers.default_shapes('NFNet', 'F0')
  with_shortcut = [i for i in range(12) if ARCH.block_path(i) + '/~/conv_shortcut' in got]
  assert with_shortcut == [0, 1, 3, 9]


def test_f0_has_71_49m_params():
  n = helpers.count(helpers.default_shapes('NFNet', 'F0'))
  assert round(n / 1e6, 2) == 71.49


@pytest.mark.parametrize('plus', ['', '+'])
def test_param_counts_match_the_papers_table(plus):
  """All 16 variants, traced (and counted analytically, instantly). Depths grow
  as (k + 1) x F0's, so every count is affine in k."""
  traced = {k: helpers.count(helpers.default_shapes('NFNet', f'F{k}{plus}')) for k in range(8)}
  for k in range(8):
    assert traced[k] == traced[0] + k * (traced[1] - traced[0]), k
    assert round(traced[k] / 1e6, 2) == NFNET_PARAMS_M[f'F{k}{plus}'], f'F{k}{plus}'
    assert nfnet.count_flops(f'F{k}{plus}').params == traced[k]


def test_narrow_param_tree_follows_the_paper():
  got = helpers.model_shapes('NFNet', 'F0', 10, width=0.125, group_size=16)
  want = expected_param_shapes(NFNET_DEPTHS['F0'], NFNET_WIDTHS, 10, width=0.125, group_size=16)
  assert got == want


def test_plus_variant_stem_and_final_conv():
  got = helpers.default_shapes('NFNet', 'F0+')
  assert got[f'{TOP}/~/stem_conv3']['w'] == (3, 3, 64, 192)
  assert got[f'{TOP}/~/final_conv']['w'] == (1, 1, 2048, 4096)
  assert got[f'{TOP}/~/linear']['w'] == (4096, 1000)


@pytest.mark.parametrize('variant', sorted(helpers.NFNET_GMACS_TEST))
def test_gmacs_match_the_papers_table(variant):
  train, test = NFNET_SIZES[variant][:2]
  assert round(nfnet.count_flops(variant, test).macs / 1e9, 2) == helpers.NFNET_GMACS_TEST[variant]
  assert (
    round(nfnet.count_flops(variant, train).macs / 1e9, 2) == helpers.NFNET_GMACS_TRAIN[variant]
  )
  # The default image size is the variant's test size.
  assert nfnet.count_flops(variant).macs == nfnet.count_flops(variant, test).macs


def test_f0_counts_by_hand():
  """F0 at 256 px, stem + blocks + head written out by hand from the paper."""
  stem_params = (27 * 16 + 32) + (144 * 32 + 64) + (288 * 64 + 128) + (576 * 128 + 256)
  stem_macs = 128**2 * 27 * 16 + 128**2 * 144 * 32 + 128**2 * 288 * 64 + 64**2 * 576 * 128
  head_params = (1536 * 3072 + 2 * 3072) + (3072 * 1000 + 1000)
  head_macs = 8**2 * 1536 * 3072 + 3072 * 1000  # final conv at 256 / 32 = 8 px
  total = nfnet.count_flops('F0', 256)
  # The blocks alone, by hand: stage s, block b at resolution r_s.
  block_params = block_macs = 0
  in_ch, res = 128, 64
  for depth, out_ch, stride in zip([1, 2, 6, 3], [256, 512, 1536, 1536], [1, 2, 2, 2], strict=True):
    mid = (out_ch // 2) // 128 * 128
    for b in range(depth):
      s = stride if b == 0 else 1
      out_res = res // s
      convs = [
        (res, in_ch * mid),
        (out_res, 9 * 128 * mid),
        (out_res, 9 * 128 * mid),
        (out_res, mid * out_ch),
      ]
      channels = [mid, mid, mid, out_ch]
      if s > 1 or in_ch != out_ch:
        convs.append((out_res, in_ch * out_ch))
        channels.append(out_ch)
      for (r, w), c in zip(convs, channels, strict=True):
        block_params += w + 2 * c
        block_macs += r * r * w
      hidden = out_ch // 2
      block_params += out_ch * hidden + hidden + hidden * out_ch + out_ch + 1
      block_macs += 2 * out_ch * hidden
      in_ch, res = out_ch, out_res
  assert total.params == stem_params + block_params + head_params
  assert total.macs == stem_macs + block_macs + head_macs


# ---------------------------------------------------------------------------
# Betas and block shapes.
# ---------------------------------------------------------------------------
def test_f0_betas_match_the_published_list():
  _, specs = nfnet.block_specs('F0')
  np.testing.assert_allclose([s.beta for s in specs], helpers.F0_BETAS, atol=5e-5)


def test_block_specs_shapes_follow_the_paper():
  for variant in ('F1', 'F0+'):
    widths = published_widths(variant)
    stem, specs = nfnet.block_specs(variant)
    want = paper_blocks(NFNET_DEPTHS[variant.rstrip('+')], widths)
    assert stem == widths[0] // 2
    got = [
      dict(
        in_ch=s.in_ch,
        out_ch=s.out_ch,
        stride=s.stride,
        mid=s.bottleneck_ch,
        groups=s.groups,
        proj=s.stride > 1 or s.in_ch != s.out_ch,
      )
      for s in specs
    ]
    assert got == want


# ---------------------------------------------------------------------------
# Forward pass: the narrow F0 of conftest.py, intermediates captured.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def run(narrow_run):
  return narrow_run('NFNet')


def narrow_blocks(run):
  return paper_blocks(NFNET_DEPTHS[run.variant], NFNET_WIDTHS, **run.kwargs)


def test_stem_layout(run):
  """Four 3x3 convs, 16/32/64 channels then half the first stage's, strides 2, 1,
  1, 2 (total stride 4)."""
  _, caps = run.runs[0.0]
  half, quarter = run.size // 2, run.size // 4
  stem_ch = int(NFNET_WIDTHS[0] * run.kwargs['width']) // 2
  assert [caps[f'{TOP}/~/stem_conv{i}'][1].shape for i in range(4)] == [
    (run.batch, half, half, 16),
    (run.batch, half, half, 32),
    (run.batch, half, half, 64),
    (run.batch, quarter, quarter, stem_ch),
  ]


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
  assert seen[f'{TOP}/~/stem_conv3'].shape[1:3] == (10, 10)
  assert [seen[ARCH.block_path(i)][0].shape[1] for i in (0, 1, 3, 9)] == [10, 5, 3, 2]
  assert seen[f'{TOP}/~/final_conv'].shape == (2, 2, 2, 2 * 192)
  assert out[f'{TOP}/~/linear']['w'].shape == (2 * 192, 10)


def test_stem_activations(run):
  _, caps = run.runs[0.0]
  for i in range(3):  # act after stem_conv0..2
    assert_close(caps[f'{TOP}/~/stem_conv{i + 1}'][0], np_act(caps[f'{TOP}/~/stem_conv{i}'][1]))
  # No activation after stem_conv3: the first block gets its raw output.
  np.testing.assert_array_equal(caps[ARCH.block_path(0)][0], caps[f'{TOP}/~/stem_conv3'][1])


def test_blocks_apply_the_recurrence_betas(run):
  """conv0's input is act(x) * beta, with beta from the recurrence."""
  _, caps = run.runs[0.0]
  betas = helpers.recurrence_betas(NFNET_DEPTHS['F0'])
  for i in range(12):
    x_in = caps[ARCH.block_path(i)][0]
    conv0_in = caps[ARCH.block_path(i) + '/~/conv0'][0]
    got_beta = float(
      np.sum(np.asarray(conv0_in, np.float64) * np_act(x_in)) / np.sum(np_act(x_in) ** 2)
    )
    assert got_beta == pytest.approx(betas[i], rel=1e-5), f'block {i}'
    assert_close(conv0_in, np_act(x_in) * betas[i])


@pytest.mark.parametrize('skip_gain', [0.0, 0.7])
def test_block_formula(run, skip_gain):
  """out = act(x)*beta -> conv0 -> act -> conv1 -> act -> conv1b -> act -> conv2;
  out = 2 * se(out) * out * skip_gain * alpha + shortcut, the shortcut a 2x2
  average pool then a 1x1 conv where strided (2102.06171, fig. 6)."""
  _, caps = run.runs[skip_gain]
  for i, b in enumerate(narrow_blocks(run)):
    n = ARCH.block_path(i)
    x_in, (y, branch) = caps[n]
    c = {k: caps[f'{n}/~/{k}'] for k in ('conv0', 'conv1', 'conv1b', 'conv2')}
    assert_close(c['conv1'][0], np_act(c['conv0'][1]))
    assert_close(c['conv1b'][0], np_act(c['conv1'][1]))
    assert_close(c['conv2'][0], np_act(c['conv1b'][1]))
    se_in, gate = caps[n + '/~/squeeze_excite']
    np.testing.assert_array_equal(se_in, c['conv2'][1])
    conv0_in = c['conv0'][0]
    if b['stride'] > 1:
      assert_close(caps[n + '/~/conv_shortcut'][0], helpers.np_avg_pool_2x2(conv0_in))
      shortcut = caps[n + '/~/conv_shortcut'][1]
    elif b['proj']:
      assert_close(caps[n + '/~/conv_shortcut'][0], conv0_in)
      shortcut = caps[n + '/~/conv_shortcut'][1]
    else:
      assert n + '/~/conv_shortcut' not in caps
      shortcut = x_in
    want_branch = np.asarray(gate, np.float64) * 2 * np.asarray(c['conv2'][1], np.float64)
    assert_close(branch, want_branch)
    assert_close(y, want_branch * skip_gain * ALPHA + np.asarray(shortcut, np.float64))
    if skip_gain == 0 and not b['proj']:
      np.testing.assert_array_equal(y, x_in)  # SkipInit: identity at init


def test_signal_level_at_init(run):
  """At initialisation the only systematic loss of variance is the 2x2 average
  pool on each transition's shortcut, which on spatially white N(0, 1) inputs
  averages 4 nearly independent values (variance / 4). Undoing that factor, every
  block's output variance stays of unit order through F0's three pooled stages."""
  out, _ = run.runs[0.0]
  avg_var = np.array([float(out[f'block_{i}']['avg_var']) for i in range(12)])
  normalised = avg_var * 4.0 ** run.stage_of_block()
  assert np.all((normalised > 0.3) & (normalised < 3)), normalised


# ---------------------------------------------------------------------------
# Conv lowering on a whole narrow network.
# ---------------------------------------------------------------------------
def test_dense_and_native_lowering_agree_on_network(monkeypatch):
  # A test-only variant with F0's widths but depths [1, 2, 1, 1]: every kind of
  # block (channel-change projection, strided projection, identity) and grouped
  # convs of 1, 2 and 6 groups, at 5/12 of F0's compile time.
  monkeypatch.setitem(
    nfnet.NFNET_VARIANTS, 'T5', {**nfnet.NFNET_VARIANTS['F0'], 'depth': [1, 2, 1, 1]}
  )
  f = hk.without_apply_rng(
    hk.transform(lambda x: nfnet.NFNet(10, 'T5', width=0.125, group_size=16)(x, False)['logits'])
  )
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  params = helpers.init_like_params(shapes, rng, f'{TOP}/~/linear', fc_std=0.3)
  # Switch every residual branch on, so the grouped convs shape the output.
  params = helpers.with_skip_gain(params, 1.0)
  helpers.assert_lowerings_agree(f.apply, params, x, rng)
