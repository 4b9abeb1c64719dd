"""What every model family does, tested once per family of the registry.

Every test here runs for each family in `nfnet_jax.models.FAMILIES`; what it
expects comes from the published architectures in tests/helpers.py (2102.06171,
2101.08692 and DeepMind's released nfnets code), so a new family needs its entry
there (and in helpers.NARROW) before these tests pass. Facts only one family has
are in that family's module (test_nfnet.py, test_nf_resnet.py, test_nf_regnet.py).
"""

import importlib
import inspect
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.models import FAMILIES, layers
from nfnet_jax.models.family import (
  SKIP_GAIN,
  Cost,
  conv_cost,
  linear_cost,
  lookup_variant,
  out_size,
  squeeze_excite_cost,
)
from tests import helpers

NAMES = list(FAMILIES)
per_family = pytest.mark.parametrize('name', NAMES)
ALPHA = 0.2


def family_module(fam):
  """The family's own module (nfnet.py, ...): each has a `block_specs`."""
  return importlib.import_module(fam.model.__module__)


def constructed(fam, num_classes=10, **kwargs):
  """The model object, constructed (not called) inside a Haiku transform."""
  box = []
  hk.transform(lambda: box.append(fam.model(num_classes, **kwargs))).init(None)
  return box[0]


def is_block(arch, module_name):
  return (
    re.fullmatch(re.escape(f'{arch.root}/~/{arch.block}') + r'(_\d+)?', module_name) is not None
  )


def stage_widths(arch, variant, width):
  return [int(w * width) for w in arch.widths[variant]]


def test_every_family_has_a_published_reference():
  assert set(helpers.ARCHITECTURES) == set(FAMILIES)
  assert set(helpers.NARROW) == set(FAMILIES)
  assert set(COST_CONFIGS) == set(FAMILIES)


# ---------------------------------------------------------------------------
# The variant table, the Family record, building every variant.
# ---------------------------------------------------------------------------
@per_family
def test_variant_table_rows_match_the_published_table(name):
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  assert set(fam.variants) == set(arch.depths)
  for key, row in fam.variants.items():
    assert {'depth', 'width', 'train_imsize', 'test_imsize'} <= set(row), key
    assert list(row['depth']) == list(arch.depths[key]), key
    assert list(row['width']) == list(arch.widths[key]), key
    assert (row['train_imsize'], row['test_imsize']) == arch.sizes[key], key
    assert row.get('drop_rate', 0.0) == arch.dropout[key], key


# Where a family's configs start from other values than its class, and why.
DOCUMENTED_DIFFERENCES = {
  # DeepMind's experiment.py trains NFNets with 0.25; nfnet.py's class default is 0.1.
  ('NFNet', 'stochdepth_rate'): (helpers.NFNET_TRAIN_STOCHDEPTH, 0.1),
  # NFResNet's docstring: drop_rate=None means no dropout (NF-ResNets have no
  # per-variant rate); the configs write it 0.0.
  ('NFResNet', 'drop_rate'): (0.0, None),
}


@per_family
def test_family_defaults_are_the_model_defaults(name):
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  signature = inspect.signature(fam.model.__init__).parameters
  for key, value in fam.defaults.items():
    assert key in signature, key
    default = signature[key].default
    if (name, key) in DOCUMENTED_DIFFERENCES:
      assert (value, default) == DOCUMENTED_DIFFERENCES[name, key], key
    else:
      assert value == default, key
  assert fam.defaults['width'] == signature['width'].default == arch.default_width
  # The documented drop_rate difference changes nothing: None and 0.0 mean no dropout.
  if (name, 'drop_rate') in DOCUMENTED_DIFFERENCES:
    assert constructed(fam, drop_rate=None).drop_rate == 0.0
    assert constructed(fam, **fam.defaults).drop_rate == 0.0


@pytest.mark.parametrize(
  'name,variant', [(n, v) for n, fam in FAMILIES.items() for v in fam.variants]
)
def test_every_variant_builds_with_its_defaults(name, variant):
  """Built with its family's default arguments at 1000 classes: residual blocks
  named as released, one skip_gain each, the classifier on the published head
  width, and as many parameters as the cost counter says."""
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  shapes = helpers.default_shapes(name, variant)
  assert helpers.count(shapes) == fam.count_flops(variant).params
  assert all(m.startswith(arch.root + '/~/') for m in shapes)
  blocks = [m for m in shapes if is_block(arch, m)]
  assert sorted(blocks) == sorted(arch.block_path(i) for i in range(sum(arch.depths[variant])))
  assert all(shapes[b] == {'skip_gain': ()} for b in blocks)
  head = arch.head_channels(stage_widths(arch, variant, arch.default_width)[-1])
  assert shapes[fam.classifier_module()] == {'w': (head, 1000), 'b': (1000,)}
  assert fam.classifier_module() == f'{arch.root}/~/linear'


# (variant, image size, num_classes, model arguments): odd widths exercise the
# rounding of widths, bottlenecks and SE hidden sizes; odd image sizes the SAME
# padding arithmetic.
COST_CONFIGS = {
  'NFNet': [
    ('F0', 64, 1000, {}),
    ('F1+', 32, 10, {'width': 0.25, 'group_size': 32}),
    ('F0', 40, 10, {'width': 0.125, 'group_size': 16}),
    ('F1', 37, 7, {'width': 0.3, 'group_size': 16, 'se_ratio': 0.25}),
    ('F0+', 50, 3, {'width': 0.2, 'group_size': 8, 'final_conv_mult': 3, 'use_two_convs': False}),
    ('F0', 33, 5, {'width': 0.125, 'group_size': 16, 'final_conv_ch': 100}),
  ],
  'NFResNet': [
    ('ResNet50', 64, 1000, {}),
    ('ResNet101', 37, 7, {'width': 0.5, 'use_se': True, 'se_ratio': 0.3}),
    ('ResNet50', 33, 10, {'width': 1.5}),
  ],
  'NFRegNet': [
    ('B0', 64, 1000, {}),
    ('B2', 37, 7, {'width': 0.3, 'group_size': 4, 'se_ratio': 0.25}),
    ('B1', 50, 3, {'width': 0.5, 'expansion': 3.0, 'se_ratio': 0.0}),
  ],
}


@pytest.mark.parametrize(
  'name,variant,size,classes,kw',
  [(name, *config) for name, configs in COST_CONFIGS.items() for config in configs],
)
def test_cost_counter_matches_the_model(name, variant, size, classes, kw):
  """Parameters: Haiku's tree; MACs: measured on the traced model (helpers.measure_cost)."""
  fam = FAMILIES[name]
  want = helpers.measure_cost(lambda: fam.model(classes, variant=variant, **kw), size)
  got = fam.count_flops(variant, size, num_classes=classes, **kw)
  assert (got.params, got.macs) == want


@per_family
def test_cost_counter_conventions(name):
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  variant = helpers.NARROW[name][0]
  test_size = arch.sizes[variant][1]
  # The default image size is the variant's test size (2102.06171 table 3).
  assert fam.count_flops(variant) == fam.count_flops(variant, test_size)
  # Arguments that change no shape are accepted and ignored, so the counter takes
  # whatever a config holds.
  assert fam.count_flops(variant, **fam.defaults) == fam.count_flops(variant)
  # num_classes changes only the classifier.
  head = arch.head_channels(stage_widths(arch, variant, arch.default_width)[-1])
  a = fam.count_flops(variant, test_size, num_classes=1000)
  b = fam.count_flops(variant, test_size, num_classes=10)
  assert a.params - b.params == 990 * head + 990
  assert a.macs - b.macs == 990 * head


# ---------------------------------------------------------------------------
# Bad arguments and inputs.
# ---------------------------------------------------------------------------
@per_family
def test_unknown_variant_lists_valid_ones(name):
  fam = FAMILIES[name]
  with pytest.raises(ValueError) as err:
    helpers.traced_shapes(lambda: fam.model(10, variant='X9'))
  msg = str(err.value)
  assert 'X9' in msg and all(v in msg for v in fam.variants)
  with pytest.raises(ValueError, match='X9'):
    fam.count_flops('X9')
  first = next(iter(fam.variants))
  with pytest.raises(ValueError, match=re.escape(first)):
    family_module(fam).block_specs(first.lower())


@per_family
def test_bad_inputs_raise(name):
  fam = FAMILIES[name]
  variant, kwargs, _, _ = helpers.NARROW[name]
  f = hk.transform(lambda x: fam.model(10, variant=variant, **kwargs)(x, False))
  with pytest.raises(ValueError, match='rank 4'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))
  with pytest.raises(TypeError, match='uint8'):
    jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))


# ---------------------------------------------------------------------------
# Betas and stochastic-depth rates (2101.08692, section 4).
# ---------------------------------------------------------------------------
@per_family
@pytest.mark.parametrize(
  'alpha,rate', [(None, None), (0.5, 0.25)], ids=['defaults', 'alpha0.5-rate0.25']
)
def test_block_specs_follow_the_published_layout(name, alpha, rate):
  """For every variant: betas from the recurrence, rates linear in the block
  index, strides on each stage's first block, channels from the published widths.
  Without arguments, the released classes' alpha 0.2 and stochastic depth 0.1."""
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  block_specs = family_module(fam).block_specs
  kwargs = {} if alpha is None else dict(alpha=alpha, stochdepth_rate=rate)
  alpha, rate = (0.2, 0.1) if alpha is None else (alpha, rate)
  for variant in fam.variants:
    stem, specs = block_specs(variant, **kwargs)
    depths, n = arch.depths[variant], sum(arch.depths[variant])
    np.testing.assert_allclose(
      [s.beta for s in specs], helpers.recurrence_betas(depths, alpha), rtol=1e-12
    )
    np.testing.assert_allclose(
      [s.stochdepth_rate for s in specs], [rate * i / n for i in range(n)], rtol=1e-12, atol=0
    )
    assert [s.stride for s in specs] == [
      arch.strides[stage] if b == 0 else 1
      for stage, depth in enumerate(depths)
      for b in range(depth)
    ]
    widths = stage_widths(arch, variant, arch.default_width)
    assert [s.out_ch for s in specs] == [
      widths[stage] for stage, depth in enumerate(depths) for _ in range(depth)
    ]
    assert stem == arch.stem_channels(arch.default_width, widths[0])
    assert [s.in_ch for s in specs] == [stem] + [s.out_ch for s in specs[:-1]]


@per_family
def test_model_blocks_carry_the_betas(name):
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  variant, kwargs, _, _ = helpers.NARROW[name]
  model = constructed(fam, variant=variant, alpha=0.5, stochdepth_rate=0.3, **kwargs)
  n = sum(arch.depths[variant])
  np.testing.assert_allclose(
    [b.beta for b in model.blocks], helpers.recurrence_betas(arch.depths[variant], 0.5), rtol=1e-12
  )
  np.testing.assert_allclose(
    [b.stochdepth_rate for b in model.blocks], [0.3 * i / n for i in range(n)]
  )
  assert all(b.alpha == 0.5 for b in model.blocks)


# ---------------------------------------------------------------------------
# Initialisation.
# ---------------------------------------------------------------------------
@per_family
def test_initialisation(name):
  """SkipInit: every skip_gain starts at 0; WS convs start with gain 1 and bias 0;
  the classifier's weights start N(0, fc_std^2) (zeros where fc_std is 0), its
  bias 0."""
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  variant, kwargs, _, _ = helpers.NARROW[name]
  inits = helpers.recorded_inits(lambda: fam.model(500, variant=variant, **kwargs))
  skip = [k for k in inits if k[1] == 'skip_gain']
  assert sorted(m for m, _ in skip) == sorted(
    arch.block_path(i) for i in range(sum(arch.depths[variant]))
  )
  for key in skip:
    assert helpers.initial_value(*inits[key]) == 0.0, key
  for (module, param), (shape, dtype, init) in inits.items():
    if param in ('gain', 'bias'):
      want = 1.0 if param == 'gain' else 0.0
      np.testing.assert_array_equal(
        helpers.initial_value(shape, dtype, init), want, err_msg=f'{module} {param}'
      )
  w = helpers.initial_value(*inits[fam.classifier_module(), 'w'])
  head = arch.head_channels(stage_widths(arch, variant, kwargs['width'])[-1])
  assert w.shape == (head, 500)
  if arch.fc_std:
    assert w.std() == pytest.approx(arch.fc_std, rel=0.03)  # >= 55k samples
    assert abs(w.mean()) < 3e-4
  else:
    np.testing.assert_array_equal(w, 0)
  np.testing.assert_array_equal(helpers.initial_value(*inits[fam.classifier_module(), 'b']), 0)


# ---------------------------------------------------------------------------
# Training mode: stochastic depth and dropout.
# ---------------------------------------------------------------------------
@per_family
def test_block_stochastic_depth(name):
  """The last block (no projection) at rate 0.5: in training each example's
  branch is kept whole and unscaled, or dropped whole; in eval never dropped,
  whatever the key."""
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  variant, kwargs, _, _ = helpers.NARROW[name]
  n, batch = sum(arch.depths[variant]), 64
  rate = 0.5 * n / (n - 1)  # the last block's rate: rate * (n - 1) / n

  def fn(x, is_training):
    block = fam.model(10, variant=variant, stochdepth_rate=rate, **kwargs).blocks[-1]
    return block(x, is_training), block(x, False)

  f = hk.transform(fn)
  channels = stage_widths(arch, variant, kwargs['width'])[-1]
  # One example repeated: kept examples must all equal the eval output.
  x = jnp.asarray(
    np.tile(np.random.default_rng(0).standard_normal((1, 4, 4, channels)), (batch, 1, 1, 1)),
    jnp.float32,
  )
  shapes = jax.eval_shape(lambda k, x: f.init(k, x, True), jax.random.PRNGKey(0), x)
  params = helpers.random_params(shapes, np.random.default_rng(1), skip_gain=1.0)
  apply = jax.jit(f.apply, static_argnums=3)
  with layers.conv_impl('native'):  # compiles faster; the values are the same
    (y, branch), (y_eval, branch_eval) = apply(params, jax.random.key(1, impl='rbg'), x, True)
    for seed in (1, 2):
      (y_e, _), _ = apply(params, jax.random.key(seed, impl='rbg'), x, False)
      np.testing.assert_array_equal(y_e, y_eval)
  y, y_eval, x64 = (np.asarray(a, np.float64) for a in (y, y_eval, x))
  branch, branch_eval = np.asarray(branch), np.asarray(branch_eval)
  assert np.abs(y_eval - x64).max() > 1e-2  # the branch is not negligible
  kept = np.all(np.isclose(y, y_eval, rtol=1e-5, atol=1e-6), axis=(1, 2, 3))
  dropped = np.all(y == x64, axis=(1, 2, 3))
  assert np.all(kept ^ dropped)
  assert np.all(branch[dropped] == 0)
  np.testing.assert_array_equal(branch[kept], branch_eval[kept])  # whole, unscaled
  assert 0.2 < dropped.mean() < 0.8  # 64 draws at p = 0.5


@per_family
def test_eval_needs_no_rng_and_training_does(name, narrow_run):
  """Not training, nothing is random (no stochastic depth, no dropout): the model
  runs without a key, and returns only logits and pool without return_metrics."""
  run = narrow_run(name)
  f = hk.transform(
    lambda x, t: run.family.model(run.classes, variant=run.variant, **run.kwargs)(x, t)
  )
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(lambda p, x: f.apply(p, None, x, False), run.params, x)
  assert set(out) == {'logits', 'pool'}
  with pytest.raises(ValueError, match='PRNGKey'):
    jax.eval_shape(lambda p, x: f.apply(p, None, x, True), run.params, x)


@per_family
def test_default_dropout_is_the_variants(name):
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  for variant in fam.variants:
    assert constructed(fam, variant=variant).drop_rate == arch.dropout[variant], variant
  assert constructed(fam, drop_rate=0.35).drop_rate == 0.35


def _head_cases():
  """Per family: the narrow variant with its own rate, the first variant with the
  highest published rate (where that differs), and explicit rates."""
  cases = []
  for name in FAMILIES:
    dropout = helpers.ARCHITECTURES[name].dropout
    first = helpers.NARROW[name][0]
    cases += [(name, first, rate) for rate in (None, 0.0, 0.35, 0.5)]
    top = max(dropout.values())
    cases += [(name, v, None) for v in dropout if dropout[v] == top != dropout[first]][:1]
  return cases


@pytest.mark.parametrize('name,variant,drop_rate', _head_cases())
def test_classifier_dropout_only_in_training(name, variant, drop_rate):
  """pool -> dropout (training only, rate = the variant's unless given) -> linear.
  Blocks are intercepted as identities, so only the stem and the head run."""
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  kwargs = helpers.NARROW[name][1]
  want = arch.dropout[variant] if drop_rate is None else drop_rate

  def fn(x, is_training):
    seen = {}

    def intercept(method, args, kw, context):
      if context.method_name == '__call__':
        if is_block(arch, context.module.module_name):
          return args[0], args[0]
        if context.module.module_name == fam.classifier_module():
          seen['fc_in'] = args[0]
      return method(*args, **kw)

    with hk.intercept_methods(intercept):
      out = fam.model(10, variant=variant, drop_rate=drop_rate, **kwargs)(x, is_training)
    return out, seen['fc_in']

  f = hk.transform(fn)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 16, 16, 3)), jnp.float32)
  shapes = jax.eval_shape(lambda k, x: f.init(k, x, True), jax.random.PRNGKey(0), x)
  params = helpers.random_params(shapes, np.random.default_rng(2))
  # Eager (no jit): every case has the same shapes, so XLA's per-op cache is shared.
  out, fc_in = f.apply(params, jax.random.key(3, impl='rbg'), x, True)
  pool, fc_in = np.asarray(out['pool'], np.float64), np.asarray(fc_in, np.float64)
  if want == 0:
    np.testing.assert_array_equal(fc_in, pool)
  else:
    # Dropout: kept units rescaled by 1 / (1 - rate); the drop fraction within
    # 5 binomial standard deviations of the rate.
    kept = fc_in != 0
    np.testing.assert_allclose(fc_in[kept], pool[kept] / (1 - want), rtol=1e-6)
    assert 1 - kept.mean() == pytest.approx(want, abs=5 * np.sqrt(want * (1 - want) / pool.size))
  # Not training: no dropout whatever the rate.
  out, fc_in = f.apply(params, None, x, False)
  np.testing.assert_array_equal(fc_in, out['pool'])


# ---------------------------------------------------------------------------
# Forward pass of a narrow network (tests/models/conftest.py).
# ---------------------------------------------------------------------------
@per_family
def test_forward_shapes_and_metrics(name, narrow_run):
  """Logits, pooled features and per-block signal statistics; every block's output
  shape from the published widths and strides (total stride 32)."""
  run = narrow_run(name)
  arch, out, caps = run.arch, *run.runs[1.0]
  widths = stage_widths(arch, run.variant, run.kwargs['width'])
  n = run.num_blocks
  assert out['logits'].shape == (run.batch, run.classes)
  assert out['pool'].shape == (run.batch, arch.head_channels(widths[-1]))
  assert np.all(np.isfinite(out['logits'])) and np.abs(out['logits']).max() > 0
  assert sorted(out) == sorted(['logits', 'pool'] + [f'block_{i}' for i in range(n)])
  for i in range(n):
    assert set(out[f'block_{i}']) == {'avg_sq_mean', 'avg_var', 'res_avg_var'}
    assert all(np.isfinite(v) for v in out[f'block_{i}'].values())
  side = -(-run.size // arch.stem_stride)
  stem = caps[arch.block_path(0)][0]
  assert stem.shape == (run.batch, side, side, arch.stem_channels(run.kwargs['width'], widths[0]))
  want = []
  for stage, depth in enumerate(arch.depths[run.variant]):
    side = -(-side // arch.strides[stage])
    want += [(run.batch, side, side, widths[stage])] * depth
  assert [caps[arch.block_path(i)][1][0].shape for i in range(n)] == want
  assert side == -(-run.size // 32)


@per_family
def test_head(name, narrow_run):
  """pool = mean over space of act(features), features = final_conv(last block's
  output) where there is a final conv, else that output; logits = pool W + b."""
  run = narrow_run(name)
  arch, fam, (out, caps) = run.arch, run.family, run.runs[0.7]
  last = caps[arch.block_path(run.num_blocks - 1)][1][0]
  final_conv = f'{arch.root}/~/final_conv'
  assert (final_conv in caps) == arch.final_conv
  features = last
  if arch.final_conv:
    np.testing.assert_array_equal(caps[final_conv][0], last)
    features = caps[final_conv][1]
  pool = helpers.np_scaled(arch.activation)(features).mean(axis=(1, 2))
  helpers.assert_close(out['pool'], pool)
  np.testing.assert_array_equal(caps[fam.classifier_module()][0], out['pool'])
  fc = run.params[fam.classifier_module()]
  helpers.assert_close(
    out['logits'],
    np.asarray(out['pool'], np.float64) @ np.asarray(fc['w'], np.float64) + np.asarray(fc['b']),
  )


# ---------------------------------------------------------------------------
# Signal propagation at initialisation (2101.08692, section 4 and fig. 1).
# ---------------------------------------------------------------------------
def _stats(out, key, n):
  return np.array([float(out[f'block_{i}'][key]) for i in range(n)])


def _stage_starts(run):
  return np.cumsum([0] + list(run.arch.depths[run.variant][:-1]))


@per_family
def test_signal_propagation_at_init(name, narrow_run):
  """skip_gain = 0 (SkipInit): identity blocks pass their input through unchanged,
  and each transition's projection keeps the variance of its pre-activated,
  downsampled input act(x) * beta (scaled WS preserves variance); channel means
  stay near 0 (scaled WS removes the mean shift)."""
  run = narrow_run(name)
  arch, (out, caps), n = run.arch, run.runs[0.0], run.num_blocks
  avg_var, res_var = _stats(out, 'avg_var', n), _stats(out, 'res_avg_var', n)
  assert np.all(np.isfinite(avg_var)) and np.all(res_var > 0)
  sq_mean = _stats(out, 'avg_sq_mean', n)
  assert np.all(sq_mean < 0.1), sq_mean
  starts = _stage_starts(run)
  for i in range(n):
    if i not in starts:
      assert avg_var[i] == avg_var[i - 1], i
  betas = helpers.recurrence_betas(arch.depths[run.variant])
  act = helpers.np_scaled(arch.activation)
  for stage, i in enumerate(starts):
    z = act(caps[arch.block_path(i)][0]) * betas[i]
    stride = arch.strides[stage]
    if stride > 1:
      z = helpers.np_avg_pool_2x2(z) if arch.pooled_shortcut else z[:, ::stride, ::stride]
    ratio = avg_var[i] / z.var(axis=(0, 1, 2)).mean()
    assert 0.7 < ratio < 1.3, (i, ratio)


@per_family
def test_signal_variance_grows_with_expected_std(name, narrow_run):
  """skip_gain = 1: each non-transition block adds alpha^2 * Var(branch) to the
  variance (x + alpha * r, the branch nearly uncorrelated with x): the bookkeeping
  behind expected_std^2 += alpha^2."""
  run = narrow_run(name)
  arch, (out, _), n = run.arch, run.runs[1.0], run.num_blocks
  avg_var, res_var = _stats(out, 'avg_var', n), _stats(out, 'res_avg_var', n)
  # Undoing the average pools' variance / 4 on spatially white inputs (natural
  # images are smooth and lose far less), every block's output variance stays of
  # unit order.
  stage = run.stage_of_block()
  pooled = np.array(
    [sum(s > 1 for s in arch.strides[: k + 1]) if arch.pooled_shortcut else 0 for k in stage]
  )
  normalised = avg_var * 4.0**pooled
  assert np.all((normalised > 0.3) & (normalised < 3)), normalised
  for start, depth in zip(_stage_starts(run), arch.depths[run.variant], strict=True):
    for i in range(start + 1, start + depth):
      increment = avg_var[i] - avg_var[i - 1]
      predicted = ALPHA**2 * res_var[i]
      # A band of 3x each way leaves room for the (small) cross term.
      assert 0.3 * predicted < increment < 3 * predicted, (i, increment, predicted)
    # Across a stage the variance grows monotonically, and by much less than it
    # would without alpha (alpha^2 = 0.04 per block).
    if depth > 1:
      stage_var = avg_var[start : start + depth]
      assert np.all(np.diff(stage_var) > 0)
      assert stage_var[-1] / stage_var[0] < 1 + 3 * ALPHA**2 * (depth - 1)


# ---------------------------------------------------------------------------
# family.py's cost arithmetic and the Family record's names.
# ---------------------------------------------------------------------------
def test_cost_arithmetic():
  assert Cost(1, 2) + Cost(3, 4) == Cost(4, 6)
  assert [out_size(s, 2) for s in (7, 8, 1)] == [4, 4, 1]  # SAME: ceil
  # A 3x3 stride-2 conv, 8 -> 6 channels in 2 groups, at 7 px: 4 x 4 outputs,
  # 3 * 3 * 4 * 6 weights, plus a gain and a bias per output channel.
  cost, side = conv_cost(7, 8, 6, kernel=3, stride=2, groups=2)
  assert side == 4 and cost == Cost(216 + 12, 16 * 216)
  assert linear_cost(5, 3) == Cost(18, 15)
  assert squeeze_excite_cost(8, 2) == Cost(18 + 24, 16 + 16)
  assert SKIP_GAIN == Cost(1, 0)


@per_family
def test_family_record_names(name):
  fam, arch = FAMILIES[name], helpers.ARCHITECTURES[name]
  assert fam.name == name and fam.root == arch.root and fam.block == arch.block
  names = fam.names()
  assert len(names) == len(fam.prefixes) * len(fam.variants)
  assert sorted(set(names.values())) == sorted(fam.variants)
  for key in fam.variants:
    assert fam.canonical_name(key) == fam.prefixes[0] + key
    assert all(names[p + key] == key for p in fam.prefixes)
  assert fam.classifier_module('Other') == 'Other/~/linear'
  with pytest.raises(ValueError, match=re.escape(', '.join(fam.variants))):
    lookup_variant(fam.variants, fam.title, 'X9')
