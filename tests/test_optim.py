"""Tests for nfnet_jax.optim: AGC, parameter groups, SGD+AGC, schedule, EMA.

The NumPy references below are written from the paper's definition of AGC
(arXiv 2102.06171 section 4.1, eq. 3, and appendix C), independently of the
implementation:

  unit-wise norm: per output unit (HWIO conv: axes 0,1,2; IO linear: axis 0);
  scalars and vectors (after squeezing size-1 axes) use the whole-tensor norm.
  clip: where ||G|| > max(||W||, eps) * clipping,
        G <- G * max(||W||, eps) * clipping / max(||G||, 1e-6).
"""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnet_jax import optim

FAST = settings(max_examples=25, deadline=None)

# Every parameter shape an NFNet/NF-ResNet/NF-RegNet has, plus size-1 edge cases.
AGC_SHAPES = {
  'conv3x3': (3, 3, 16, 32),
  'conv1x1': (1, 1, 32, 64),
  'grouped_conv': (3, 3, 16, 64),  # HWIO with I = in_channels / groups.
  'depthwise_like': (3, 3, 1, 64),
  'linear': (64, 10),
  'linear_single_in': (1, 8),  # squeezes to a vector -> whole-tensor norm.
  'linear_single_out': (64, 1),  # squeezes to a vector -> whole-tensor norm.
  'vector': (32,),
  'scalar': (),
  'padded_vector': (1, 1, 1, 8),  # e.g. a gain stored as (1, 1, 1, O).
}


# ---------------------------------------------------------------------------
# Independent NumPy reference (from the paper's equations).
# ---------------------------------------------------------------------------


def np_unit_norms(x):
  """Unit norms, one entry per unit, plus the axes they were reduced over."""
  x = np.asarray(x, np.float64)
  if np.squeeze(x).ndim <= 1:
    axes = tuple(range(x.ndim))
  elif x.ndim == 2:  # IO linear: over the input axis.
    axes = (0,)
  elif x.ndim == 4:  # HWIO conv: over H, W, I.
    axes = (0, 1, 2)
  else:
    raise AssertionError(f'no reference for shape {x.shape}')
  return np.sqrt(np.sum(x * x, axis=axes, keepdims=True)), axes


def np_agc(g, p, clipping, eps):
  g = np.asarray(g, np.float64)
  g_norm, _ = np_unit_norms(g)
  p_norm, _ = np_unit_norms(p)
  max_norm = np.maximum(p_norm, eps) * clipping
  clipped = g * max_norm / np.maximum(g_norm, 1e-6)
  return np.where(g_norm > max_norm, clipped, g)


def random_tree(rng, shapes, log_pscale, log_gscale, zero_params=False):
  """Random params/grads; the grad scale varies per output unit (last axis)."""
  params, grads = {}, {}
  for name, shape in shapes.items():
    unit_shape = shape[-1:] if shape else ()
    p = rng.standard_normal(shape) * 10.0 ** (log_pscale + rng.uniform(-1, 1, size=unit_shape))
    g = rng.standard_normal(shape) * 10.0 ** (log_gscale + rng.uniform(-2, 2, size=unit_shape))
    if zero_params:
      p = np.zeros(shape)
    params[name] = np.asarray(p, np.float32)
    grads[name] = np.asarray(g, np.float32)
  return params, grads


@jax.jit
def _agc_apply(grads, params, clipping, eps):
  tx = optim.adaptive_grad_clip(clipping, eps)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


agc_inputs = dict(
  seed=st.integers(0, 2**31 - 1),
  clipping=st.floats(1e-3, 0.5),
  eps=st.sampled_from([1e-3, 1e-2]),
  log_pscale=st.floats(-5.0, 1.0),
  log_gscale=st.floats(-5.0, 1.0),
  zero_params=st.booleans(),
)


# ---------------------------------------------------------------------------
# AGC.
# ---------------------------------------------------------------------------


@FAST
@given(**agc_inputs)
def test_agc_matches_numpy_reference(seed, clipping, eps, log_pscale, log_gscale, zero_params):
  rng = np.random.default_rng(seed)
  params, grads = random_tree(rng, AGC_SHAPES, log_pscale, log_gscale, zero_params)
  out = _agc_apply(grads, params, clipping, eps)
  for name in AGC_SHAPES:
    expected = np_agc(grads[name], params[name], clipping, eps)
    assert out[name].shape == AGC_SHAPES[name]
    assert out[name].dtype == jnp.float32
    np.testing.assert_allclose(out[name], expected, rtol=2e-5, atol=1e-30, err_msg=name)


@FAST
@given(**agc_inputs)
def test_agc_unit_properties(seed, clipping, eps, log_pscale, log_gscale, zero_params):
  rng = np.random.default_rng(seed)
  params, grads = random_tree(rng, AGC_SHAPES, log_pscale, log_gscale, zero_params)
  out = _agc_apply(grads, params, clipping, eps)
  for name in AGC_SHAPES:
    g, new = grads[name], np.asarray(out[name])
    g_norm, axes = np_unit_norms(g)
    new_norm, _ = np_unit_norms(new)
    max_norm = clipping * np.maximum(np_unit_norms(params[name])[0], eps)

    # Never increases a unit's norm.
    assert np.all(new_norm <= g_norm * (1 + 1e-6)), name

    # Units clearly under the threshold are bit-for-bit untouched.
    under = np.broadcast_to(g_norm < max_norm * (1 - 1e-4), g.shape)
    np.testing.assert_array_equal(new[under], g[under], err_msg=name)

    # Units clearly over it end exactly at clipping * max(||W||, eps),
    # keeping their direction.
    over = (g_norm > max_norm * (1 + 1e-4)).reshape(-1)
    np.testing.assert_allclose(
      new_norm.reshape(-1)[over],
      max_norm.reshape(-1)[over],
      rtol=1e-5,
      err_msg=name,
    )
    scale = np.broadcast_to(max_norm / g_norm, g.shape)
    over_b = np.broadcast_to(g_norm > max_norm * (1 + 1e-4), g.shape)
    np.testing.assert_allclose(new[over_b], (g * scale)[over_b], rtol=1e-5, atol=1e-30)


def test_agc_eps_floor_for_zero_params():
  clipping, eps = 0.01, 1e-3
  shapes = {'conv': (3, 3, 4, 8), 'skip_gain': (), 'gain': (8,)}
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  big = {k: np.full(s, 3.0, np.float32) for k, s in shapes.items()}
  tiny = {k: np.full(s, 1e-7, np.float32) for k, s in shapes.items()}

  out = _agc_apply(big, params, clipping, eps)
  for k in shapes:
    norms, _ = np_unit_norms(out[k])
    # Clipped to clipping * eps, not to zero.
    np.testing.assert_allclose(norms, clipping * eps, rtol=1e-5)
  out = _agc_apply(tiny, params, clipping, eps)
  for k in shapes:
    np.testing.assert_array_equal(out[k], tiny[k])


def test_agc_chains_with_any_optax_optimizer():
  rng = np.random.default_rng(0)
  params, grads = random_tree(rng, AGC_SHAPES, -1.0, 0.0)
  tx = optax.chain(optim.adaptive_grad_clip(0.01), optax.adam(1e-3))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  clipped = _agc_apply(grads, params, 0.01, 1e-3)
  ref = optax.adam(1e-3)
  expected, _ = jax.jit(ref.update)(clipped, ref.init(params), params)
  for k in AGC_SHAPES:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-12)


def test_agc_requires_params():
  tx = optim.adaptive_grad_clip(0.01)
  g = {'w': jnp.ones((2, 2))}
  with pytest.raises(ValueError):
    tx.update(g, tx.init(g), None)


def test_masked_agc_pairs_each_grad_with_its_own_param():
  """optax.masked hands the inner AGC masked params too: they must stay aligned.

  The classifier weight gets a tiny param norm (so it would be clipped hard if
  it were clipped) and the neighbouring leaves very different param norms, so
  any misalignment between grads and params would show up.
  """
  params = {
    'NFNet/~/final_conv': {
      'w': np.full((1, 1, 4, 6), 2.0, np.float32),
      'gain': np.ones((6,), np.float32),
      'bias': np.zeros((6,), np.float32),
    },
    'NFNet/~/linear': {
      'w': np.full((6, 3), 1e-4, np.float32),
      'b': np.full((3,), 5.0, np.float32),
    },
  }
  grads = jax.tree.map(lambda p: np.full(p.shape, 1.0, np.float32), params)
  tx = optim.adaptive_grad_clip(0.01, mask=optim.agc_mask)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Classifier weight: passed through untouched.
  np.testing.assert_array_equal(out['NFNet/~/linear']['w'], 1.0)
  for mod, name in [
    ('NFNet/~/final_conv', 'w'),
    ('NFNet/~/final_conv', 'gain'),
    ('NFNet/~/final_conv', 'bias'),
    ('NFNet/~/linear', 'b'),
  ]:
    np.testing.assert_allclose(
      out[mod][name],
      np_agc(grads[mod][name], params[mod][name], 0.01, 1e-3),
      rtol=1e-5,
      err_msg=f'{mod}:{name}',
    )


# ---------------------------------------------------------------------------
# Parameter groups.
# ---------------------------------------------------------------------------


def _tree(layout):
  """{module: [param names]} -> Haiku-style params with small arrays."""
  return {
    mod: {name: np.zeros((2,), np.float32) for name in names} for mod, names in layout.items()
  }


CONV = ['w', 'gain', 'bias']
LIN = ['w', 'b']

NFNET_LAYOUT = {
  'NFNet/~/stem_conv0': CONV,
  'NFNet/~/stem_conv1': CONV,
  'NFNet/~/stem_conv2': CONV,
  'NFNet/~/stem_conv3': CONV,
  'NFNet/~/nf_block': ['skip_gain'],
  'NFNet/~/nf_block/~/conv0': CONV,
  'NFNet/~/nf_block/~/conv1': CONV,
  'NFNet/~/nf_block/~/conv1b': CONV,
  'NFNet/~/nf_block/~/conv2': CONV,
  'NFNet/~/nf_block/~/conv_shortcut': CONV,
  'NFNet/~/nf_block/~/squeeze_excite/~/linear': LIN,
  'NFNet/~/nf_block/~/squeeze_excite/~/linear_1': LIN,
  'NFNet/~/nf_block_11': ['skip_gain'],
  'NFNet/~/nf_block_11/~/conv1': CONV,
  'NFNet/~/nf_block_11/~/squeeze_excite/~/linear': LIN,
  'NFNet/~/nf_block_11/~/squeeze_excite/~/linear_1': LIN,
  'NFNet/~/final_conv': CONV,
  'NFNet/~/linear': LIN,
}

NF_RESNET_LAYOUT = {
  'NF_ResNet/~/initial_conv': CONV,
  'NF_ResNet/~/nf_res_block': ['skip_gain'],
  'NF_ResNet/~/nf_res_block/~/conv0': CONV,
  'NF_ResNet/~/nf_res_block/~/conv1': CONV,
  'NF_ResNet/~/nf_res_block/~/conv2': CONV,
  'NF_ResNet/~/nf_res_block/~/conv_shortcut': CONV,
  'NF_ResNet/~/nf_res_block/~/squeeze_excite/~/linear': LIN,
  'NF_ResNet/~/nf_res_block/~/squeeze_excite/~/linear_1': LIN,
  'NF_ResNet/~/linear': LIN,
}

NF_REGNET_LAYOUT = {
  'NF_RegNet/~/initial_conv': CONV,
  'NF_RegNet/~/nf_block': ['skip_gain'],
  'NF_RegNet/~/nf_block/~/conv0': CONV,
  'NF_RegNet/~/nf_block/~/conv1': CONV,
  'NF_RegNet/~/nf_block/~/squeeze_excite/~/linear': LIN,
  'NF_RegNet/~/nf_block/~/squeeze_excite/~/linear_1': LIN,
  'NF_RegNet/~/nf_block/~/conv2': CONV,
  'NF_RegNet/~/final_conv': CONV,
  'NF_RegNet/~/linear': LIN,
}


def _true_pairs(mask):
  return {(m, n) for m, d in mask.items() for n, v in d.items() if v}


def _all_pairs(layout):
  return {(m, n) for m, names in layout.items() for n in names}


@pytest.mark.parametrize(
  'top,layout,block',
  [
    ('NFNet', NFNET_LAYOUT, 'nf_block_11'),
    ('NF_ResNet', NF_RESNET_LAYOUT, 'nf_res_block'),
    ('NF_RegNet', NF_REGNET_LAYOUT, 'nf_block'),
  ],
)
def test_masks_select_the_right_parameters(top, layout, block):
  params = _tree(layout)
  agc = optim.agc_mask(params)
  wd = optim.weight_decay_mask(params)
  for mask in (agc, wd):
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert all(isinstance(v, bool) for v in jax.tree.leaves(mask))

  classifier = f'{top}/~/linear'
  # AGC: everything except the classifier weight (its bias IS clipped).
  assert _true_pairs(agc) == _all_pairs(layout) - {(classifier, 'w')}
  assert agc[classifier]['b'] is True

  # Weight decay: exactly the weights, written out by hand.
  expected_wd = {(m, 'w') for m, names in layout.items() if 'w' in names}
  assert _true_pairs(wd) == expected_wd
  assert wd[classifier] == {'w': True, 'b': False}
  for se in ('linear', 'linear_1'):
    se = f'{top}/~/{block}/~/squeeze_excite/~/{se}'
    assert wd[se] == {'w': True, 'b': False}
    assert agc[se] == {'w': True, 'b': True}
  assert wd[f'{top}/~/{block}'] == {'skip_gain': False}
  assert agc[f'{top}/~/{block}'] == {'skip_gain': True}


def test_is_classifier():
  for top in ('NFNet', 'NF_ResNet', 'NF_RegNet'):
    assert optim.is_classifier(f'{top}/~/linear')
    assert not optim.is_classifier(f'{top}/~/linear_1')
    assert not optim.is_classifier(f'{top}/~/final_conv')
    assert not optim.is_classifier(f'{top}/~/nf_block/~/squeeze_excite/~/linear')
    assert not optim.is_classifier(f'{top}/~/nf_block_3/~/squeeze_excite/~/linear_1')
    assert not optim.is_classifier(f'{top}/~/nf_block/~/linear')
  assert not optim.is_classifier('linear')


# ---------------------------------------------------------------------------
# SGD + AGC against a hand computation.
# ---------------------------------------------------------------------------

SMALL_SHAPES = {
  'NFNet/~/stem_conv0': {'w': (3, 3, 2, 4), 'gain': (4,), 'bias': (4,)},
  'NFNet/~/nf_block': {'skip_gain': ()},
  'NFNet/~/nf_block/~/conv0': {'w': (1, 1, 4, 4), 'gain': (4,), 'bias': (4,)},
  'NFNet/~/nf_block/~/squeeze_excite/~/linear': {'w': (4, 2), 'b': (2,)},
  'NFNet/~/final_conv': {'w': (1, 1, 4, 6), 'gain': (6,), 'bias': (6,)},
  'NFNet/~/linear': {'w': (6, 3), 'b': (3,)},
}
# Hand-written groups for this tree.
CLIPPED = {(m, n) for m, d in SMALL_SHAPES.items() for n in d} - {('NFNet/~/linear', 'w')}
DECAYED = {
  ('NFNet/~/stem_conv0', 'w'),
  ('NFNet/~/nf_block/~/conv0', 'w'),
  ('NFNet/~/nf_block/~/squeeze_excite/~/linear', 'w'),
  ('NFNet/~/final_conv', 'w'),
  ('NFNet/~/linear', 'w'),
}


def _small_tree(rng, scale, zero_skip_gain=True):
  out = {}
  for m, d in SMALL_SHAPES.items():
    out[m] = {}
    for n, s in d.items():
      # Per-unit scales spread over 3 decades -> a mix of clipped and not.
      unit = s[-1:] if s else ()
      v = rng.standard_normal(s) * scale * 10.0 ** rng.uniform(-2, 1, unit)
      out[m][n] = np.asarray(v, np.float32)
  if zero_skip_gain:
    out['NFNet/~/nf_block']['skip_gain'] = np.zeros((), np.float32)
  return out


def np_sgd_agc_steps(params, grads_seq, lrs, momentum, nesterov, wd, clipping, eps):
  """Hand computation, per leaf: AGC -> +wd*p -> (Nesterov) momentum -> -lr."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history = []
  for grads, lr in zip(grads_seq, lrs):
    new_p = {}
    for k in p:
      g = np.asarray(grads[k], np.float64)
      if clipping and k in CLIPPED:
        g = np_agc(g, p[k], clipping, eps)
      if k in DECAYED:
        g = g + wd * p[k]
      v[k] = momentum * v[k] + g
      step = g + momentum * v[k] if nesterov else v[k]
      new_p[k] = p[k] - lr * step
    p = new_p
    history.append(dict(p))
  return history


def _flat(tree):
  return {(m, n): x for m, d in tree.items() for n, x in d.items()}


@pytest.mark.parametrize(
  'clipping,nesterov,schedule',
  [(0.01, True, False), (0.5, True, True), (0.1, False, False), (None, True, False)],
)
def test_sgd_agc_matches_hand_computation(clipping, nesterov, schedule):
  rng = np.random.default_rng(42)
  params = _small_tree(rng, 0.1)
  grads1 = _small_tree(rng, 1.0, zero_skip_gain=False)
  grads2 = _small_tree(rng, 1.0, zero_skip_gain=False)
  momentum, wd, eps = 0.9, 1e-2, 1e-3  # Large wd so a wrong mask shows.
  if schedule:
    lr = lambda count: 0.1 * (count + 1)
    lrs = [0.1, 0.2]
  else:
    lr, lrs = 0.3, [0.3, 0.3]

  tx = optim.sgd_agc(
    lr, momentum=momentum, nesterov=nesterov, weight_decay=wd, clipping=clipping, eps=eps
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  u1, state = update(grads1, state, params)
  p1 = optax.apply_updates(params, u1)
  u2, state = update(grads2, state, p1)
  p2 = optax.apply_updates(p1, u2)

  exp1, exp2 = np_sgd_agc_steps(
    _flat(params), [_flat(grads1), _flat(grads2)], lrs, momentum, nesterov, wd, clipping, eps
  )
  for got, exp in ((p1, exp1), (p2, exp2)):
    got = _flat(got)
    assert set(got) == set(exp)
    for k in exp:
      np.testing.assert_allclose(got[k], exp[k], rtol=1e-5, atol=1e-6, err_msg=str(k))

  if clipping == 0.01:
    # The scenario really exercises the masks: the classifier weight would
    # have been clipped, and clipping changed its bias and skip_gain.
    g_cls = grads1['NFNet/~/linear']['w']
    p_cls = params['NFNet/~/linear']['w']
    assert not np.allclose(np_agc(g_cls, p_cls, clipping, eps), g_cls)
    for m, n in [('NFNet/~/linear', 'b'), ('NFNet/~/nf_block', 'skip_gain')]:
      assert not np.allclose(np_agc(grads1[m][n], params[m][n], clipping, eps), grads1[m][n])


# ---------------------------------------------------------------------------
# Clip-fraction metric.
# ---------------------------------------------------------------------------


_CLIP_FRACTION_MASK = {k: k not in ('linear', 'scalar') for k in AGC_SHAPES}
_clip_fraction = jax.jit(
  lambda g, p, c, e: optim.agc_clip_fraction(g, p, c, e, mask=_CLIP_FRACTION_MASK)
)


@settings(max_examples=15, deadline=None)
@given(**agc_inputs)
def test_agc_clip_fraction(seed, clipping, eps, log_pscale, log_gscale, zero_params):
  rng = np.random.default_rng(seed)
  params, grads = random_tree(rng, AGC_SHAPES, log_pscale, log_gscale, zero_params)
  mask = _CLIP_FRACTION_MASK
  frac = _clip_fraction(grads, params, clipping, eps)
  agc_out = _agc_apply(grads, params, clipping, eps)

  clipped = total = 0
  near_boundary = False
  for k in AGC_SHAPES:
    if not mask[k]:
      continue
    g_norm, axes = np_unit_norms(grads[k])
    max_norm = clipping * np.maximum(np_unit_norms(params[k])[0], eps)
    clipped += int(np.sum(g_norm > max_norm))
    total += g_norm.size
    leaf_near = bool(np.any(np.abs(g_norm / max_norm - 1) < 1e-4))
    near_boundary |= leaf_near
    if not leaf_near:
      # The metric's units are the ones the clipper acts on.
      changed = np.any(np.asarray(agc_out[k]) != grads[k], axis=axes, keepdims=True)
      np.testing.assert_array_equal(changed, g_norm > max_norm, err_msg=k)
  assert frac.dtype == jnp.float32 and frac.shape == ()
  if not near_boundary:
    assert float(frac) == pytest.approx(clipped / total, abs=1e-6)


_statistics = jax.jit(
  lambda g, p, c, e: optim.gradient_statistics(g, p, c, e, mask=_CLIP_FRACTION_MASK)
)


@settings(max_examples=15, deadline=None)
@given(**agc_inputs)
def test_gradient_statistics_match_numpy(seed, clipping, eps, log_pscale, log_gscale, zero_params):
  """Global norms over every leaf (masked or not) in float64, and the same clip
  fraction as the metric on its own."""
  rng = np.random.default_rng(seed)
  params, grads = random_tree(rng, AGC_SHAPES, log_pscale, log_gscale, zero_params)
  stats = _statistics(grads, params, clipping, eps)
  assert set(stats) == {'grad_norm', 'param_norm', 'agc_clip_fraction'}
  for key, tree in (('grad_norm', grads), ('param_norm', params)):
    want = math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values()))
    assert float(stats[key]) == pytest.approx(want, rel=1e-5), key
  assert float(stats['agc_clip_fraction']) == float(_clip_fraction(grads, params, clipping, eps))


def test_gradient_statistics_without_clipping_have_no_clip_fraction():
  tree = {'w': np.full((2, 3), 2.0, np.float32), 'b': np.array([3.0], np.float32)}
  stats = optim.gradient_statistics(tree, tree)
  assert set(stats) == {'grad_norm', 'param_norm'}
  assert float(stats['param_norm']) == pytest.approx(math.sqrt(6 * 4 + 9))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), log_scale=st.floats(-6, 2))
def test_update_norm_is_the_norm_of_the_update_tree(seed, log_scale):
  rng = np.random.default_rng(seed)
  updates = {
    k: (10**log_scale * rng.normal(size=s)).astype(np.float32) for k, s in AGC_SHAPES.items()
  }
  want = math.sqrt(sum(np.sum(np.float64(u) ** 2) for u in updates.values()))
  assert float(jax.jit(optim.update_norm)(updates)) == pytest.approx(want, rel=1e-5)


def test_agc_clip_fraction_masks_classifier_weight():
  params = _tree(NFNET_LAYOUT)
  params = jax.tree.map(lambda x: np.ones((4, 3), np.float32), params)
  grads = jax.tree.map(lambda x: np.zeros_like(x), params)
  grads['NFNet/~/linear']['w'] = np.full((4, 3), 100.0, np.float32)
  assert float(optim.agc_clip_fraction(grads, params, 0.01)) > 0
  assert float(optim.agc_clip_fraction(grads, params, 0.01, mask=optim.agc_mask)) == 0.0
  grads['NFNet/~/linear']['b'] = np.full((4, 3), 100.0, np.float32)
  n_units = 3 * len(jax.tree.leaves(params))
  frac = jax.jit(lambda g, p: optim.agc_clip_fraction(g, p, 0.01, mask=optim.agc_mask))(
    grads, params
  )
  assert float(frac) == pytest.approx(3 / (n_units - 3))


# ---------------------------------------------------------------------------
# Schedule and EMA.
# ---------------------------------------------------------------------------


def test_warmup_cosine_schedule_values():
  base_lr, batch, total, warmup = 0.1, 4096, 1000, 100
  s = optim.warmup_cosine_schedule(base_lr, batch, total, warmup)
  peak = base_lr * batch / 256
  assert peak == pytest.approx(1.6)
  np.testing.assert_allclose(s(0), 0.0, atol=1e-7)
  np.testing.assert_allclose(s(warmup // 2), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(s(warmup), peak, rtol=1e-6)
  np.testing.assert_allclose(s(warmup + (total - warmup) // 2), peak / 2, rtol=1e-5)
  # Cosine shape a quarter of the way into the decay.
  np.testing.assert_allclose(
    s(warmup + (total - warmup) // 4), peak * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-5
  )
  np.testing.assert_allclose(s(total), 0.0, atol=1e-7)
  np.testing.assert_allclose(s(total + 50), 0.0, atol=1e-7)
  # Jit-friendly with a traced step.
  np.testing.assert_allclose(jax.jit(s)(jnp.int32(warmup)), peak, rtol=1e-6)

  s = optim.warmup_cosine_schedule(0.2, 4096, total, warmup, scale_by_batch=False)
  np.testing.assert_allclose(s(warmup), 0.2, rtol=1e-6)
  with pytest.raises(ValueError):
    optim.warmup_cosine_schedule(0.1, 256, 100, 100)


def test_warmup_cosine_schedule_end_lr():
  # The released NF-RegNet schedule: peak 0.4 (not batch-scaled), cosine down to 0.001.
  total, warmup, peak, end = 1000, 100, 0.4, 0.001
  s = optim.warmup_cosine_schedule(peak, 1024, total, warmup, scale_by_batch=False, end_lr=end)
  np.testing.assert_allclose(s(0), 0.0, atol=1e-7)
  np.testing.assert_allclose(s(warmup // 4), peak / 4, rtol=1e-6)
  for frac in (0.0, 0.25, 0.5, 0.9, 1.0):
    t = warmup + int(frac * (total - warmup))
    want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
    np.testing.assert_allclose(s(t), want, rtol=1e-5)
  np.testing.assert_allclose(s(total + 500), end, rtol=1e-6)
  with pytest.raises(ValueError, match='end_lr'):
    optim.warmup_cosine_schedule(0.1, 256, 1000, 10, end_lr=0.5)
  with pytest.raises(ValueError, match='end_lr'):
    optim.warmup_cosine_schedule(0.1, 256, 1000, 10, end_lr=-1e-3)


def test_published_recipe_peak_lr():
  # 112,602 steps at batch 4096 with a 5-epoch warmup: peak 1.6.
  warmup = 5 * 112_602 // 360
  s = optim.warmup_cosine_schedule(0.1, 4096, 112_602, warmup)
  np.testing.assert_allclose(s(warmup), 1.6, rtol=1e-6)


def test_ema_decay_values():
  np.testing.assert_allclose(optim.ema_decay(0), 1 / 10, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay(1), 2 / 11, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay(10), 11 / 20, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay(10**9), 0.99999, rtol=1e-7)
  np.testing.assert_allclose(optim.ema_decay(10**9, max_decay=0.999), 0.999, rtol=1e-7)
  np.testing.assert_allclose(jax.jit(optim.ema_decay)(jnp.int32(10)), 0.55, rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(step=st.integers(0, 10**7), seed=st.integers(0, 2**31 - 1))
def test_ema_update(step, seed):
  rng = np.random.default_rng(seed)
  ema = {
    'm': {
      'w': rng.standard_normal((3, 4)).astype(np.float32),
      's': np.float32(rng.standard_normal()),
    }
  }
  params = jax.tree.map(
    lambda x: (np.asarray(x) + rng.standard_normal(np.shape(x))).astype(np.float32), ema
  )
  d = min(0.99999, (1 + step) / (10 + step))
  new = jax.jit(optim.ema_update)(ema, params, jnp.int32(step))
  for k in ('w', 's'):
    e, p = np.float64(ema['m'][k]), np.float64(params['m'][k])
    np.testing.assert_allclose(new['m'][k], e * d + p * (1 - d), rtol=1e-5, atol=1e-6)
    assert new['m'][k].dtype == jnp.float32


def test_global_norm_is_exported():
  tree = {'a': jnp.array([3.0]), 'b': jnp.array([[4.0]])}
  np.testing.assert_allclose(optim.global_norm(tree), 5.0)
