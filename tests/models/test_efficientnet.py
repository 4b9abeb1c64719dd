"""EfficientNet-B0..B7: parameter counts, shapes, compound scaling, batch norm, drop-connect."""

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
import numpy as np
import pytest

from nfnet_jax.models import efficientnet

# Trainable parameters of the Keras/TF reference at 1000 classes (tf.keras.applications
# EfficientNetB0..B7: BN scale and offset counted, moving statistics not).
PUBLISHED_PARAMS = {
  'B0': 5_288_548,
  'B1': 7_794_184,
  'B2': 9_109_994,
  'B3': 12_233_232,
  'B4': 19_341_616,
  'B5': 30_389_784,
  'B6': 43_040_704,
  'B7': 66_347_960,
}
SIZE = 32  # forward passes: B0 on 32 x 32 images


def transformed(variant='B0', num_classes=1000, **kwargs):
  def forward(x, is_training):
    return efficientnet.EfficientNet(num_classes, variant, **kwargs)(x, is_training)

  return hk.transform_with_state(forward)


def num_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize('variant', list(PUBLISHED_PARAMS))
def test_parameter_counts_are_the_published_ones(variant):
  init = transformed(variant).init
  params, state = jax.eval_shape(
    lambda rng, x: init(rng, x, True), jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))
  )
  assert num_params(params) == PUBLISHED_PARAMS[variant]
  assert efficientnet.count_flops(variant).params == PUBLISHED_PARAMS[variant]
  # Every batch norm keeps a moving mean and variance, as many as its scale and offset.
  scale_offset = sum(
    num_params(v) for path, v in params.items() if path.endswith('_bn') for v in v.values()
  )
  assert num_params(state) == scale_offset


@pytest.mark.parametrize(
  'channels, mult, expected',
  [
    (32, 1.0, 32),
    (32, 1.1, 32),  # 35.2 -> 32 (91% of it: kept)
    (40, 1.1, 48),  # 44 -> 48 (rounds half up)
    (1280, 1.1, 1408),
    (16, 1.2, 24),  # 19.2 -> 16, below 90% of 19.2: one divisor more
    (24, 1.6, 40),  # 38.4 -> 40
    (40, 1.8, 72),
    (112, 1.4, 160),  # 156.8 -> 160
    (320, 1.8, 576),
    (1280, 2.0, 2560),
    (4, 1.0, 8),  # never below the divisor
  ],
)
def test_round_filters(channels, mult, expected):
  assert efficientnet.round_filters(channels, mult) == expected


@pytest.mark.parametrize(
  'repeats, mult, expected',
  [(1, 1.0, 1), (2, 1.1, 3), (3, 1.4, 5), (4, 1.8, 8), (3, 2.2, 7), (4, 2.6, 11), (1, 3.1, 4)],
)
def test_round_repeats(repeats, mult, expected):
  assert efficientnet.round_repeats(repeats, mult) == expected


# Hand-derived from 1905.11946 table 1 and the rounding rules: per stage (blocks, channels).
STAGES = {
  'B0': [(1, 16), (2, 24), (2, 40), (3, 80), (3, 112), (4, 192), (1, 320)],
  'B3': [(2, 24), (3, 32), (3, 48), (5, 96), (5, 136), (6, 232), (2, 384)],
  'B7': [(4, 32), (7, 48), (7, 80), (10, 160), (10, 224), (13, 384), (4, 640)],
}


@pytest.mark.parametrize('variant', list(STAGES))
def test_variant_table_stages(variant):
  row = efficientnet.EFFICIENTNET_VARIANTS[variant]
  assert list(zip(row['depth'], row['width'])) == STAGES[variant]


def block_outputs(variant, size):
  """Shapes of every MBConv block's output and of the stem/head convs, by tracing."""
  shapes = {}

  def record(next_f, args, kwargs, context):
    out = next_f(*args, **kwargs)
    main = out[0] if isinstance(out, tuple) else out
    if context.method_name == '__call__' and hasattr(main, 'shape'):
      shapes[context.module.module_name] = main.shape
    return out

  def forward(x):
    with hk.intercept_methods(record):
      return efficientnet.EfficientNet(1000, variant)(x, False)

  f = hk.transform_with_state(forward)
  x = jnp.zeros((1, size, size, 3))
  params, state = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  jax.eval_shape(f.apply, params, state, None, x)
  return shapes, params


def test_stage_output_shapes_b0():
  shapes, _ = block_outputs('B0', 224)
  sides = [112, 56, 28, 14, 14, 7, 7]
  ends = np.cumsum([n for n, _ in STAGES['B0']]) - 1  # each stage's last block
  for end, side, (_, ch) in zip(ends, sides, STAGES['B0']):
    name = 'EfficientNet/~/mb_conv_block' + (f'_{end}' if end else '')
    assert shapes[name] == (1, side, side, ch)
  assert shapes['EfficientNet/~/stem_conv'] == (1, 112, 112, 32)
  assert shapes['EfficientNet/~/head_conv'] == (1, 7, 7, 1280)


@pytest.mark.parametrize('variant, size', [('B0', 224), ('B2', 260)])
def test_count_flops_macs_match_the_traced_model(variant, size):
  """MACs of every conv and the classifier, from the traced output and weight shapes."""
  shapes, params = block_outputs(variant, size)
  macs = 0
  for module, leaves in params.items():
    if 'w' in leaves:
      out = shapes[module]  # [B, H, W, C] for convs, [B, C] for the classifier
      spatial = int(np.prod(out[1:-1])) if len(out) == 4 else 1
      macs += spatial * int(np.prod(leaves['w'].shape))
  assert efficientnet.count_flops(variant, size).macs == macs


@pytest.fixture(scope='module')
def b0():
  model = transformed('B0', num_classes=10, drop_rate=0.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, SIZE, SIZE, 3)), jnp.float32)
  params, state = jax.jit(model.init, static_argnums=2)(jax.random.PRNGKey(0), x, True)
  apply = jax.jit(model.apply, static_argnums=4)
  return model, params, state, x, apply


def test_batch_norm_state_updates_in_training_and_is_used_in_eval(b0):
  _, params, state, x, apply = b0
  _, trained = apply(params, state, jax.random.PRNGKey(1), x, True)
  for module, stats in trained.items():  # every batch norm's moving statistics move
    for name, value in stats.items():
      assert np.abs(value - state[module][name]).max() > 0, (module, name)
  out, after_eval = apply(params, trained, None, x, False)
  jax.tree.map(np.testing.assert_array_equal, after_eval, trained)
  # Eval normalises with the moving statistics: each image's logits do not depend on
  # the rest of the batch, and changing the statistics changes them.
  reordered, _ = apply(params, trained, None, x[::-1], False)
  np.testing.assert_allclose(reordered['pool'][::-1], out['pool'], rtol=1e-4, atol=1e-5)
  scaled = {m: dict(v, moving_variance=v['moving_variance'] * 4) for m, v in trained.items()}
  moved, _ = apply(params, scaled, None, x, False)
  assert np.abs(moved['pool'] - out['pool']).max() > 0.1 * np.abs(out['pool']).max()


def test_drop_connect_only_in_training(b0):
  model, params, state, x, apply = b0
  outs = [apply(params, state, jax.random.PRNGKey(k), x, False)[0]['pool'] for k in (1, 2)]
  np.testing.assert_array_equal(*outs)
  # Training: the rng matters through drop-connect only (dropout is 0 here).
  trains = [apply(params, state, jax.random.PRNGKey(k), x, True)[0]['pool'] for k in (1, 2)]
  assert np.abs(trains[0] - trains[1]).max() > 1e-2 * np.abs(trains[0]).max()


def test_drop_connect_drops_whole_examples_and_rescales():
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, size=(64, 2, 2, 3)), jnp.float32)
  f = hk.transform(lambda x: efficientnet.drop_connect(x, 0.25, True))
  y = np.asarray(f.apply({}, jax.random.PRNGKey(0), x))
  kept = np.all(np.isclose(y, np.asarray(x) / 0.75), axis=(1, 2, 3))
  dropped = np.all(y == 0, axis=(1, 2, 3))
  assert np.all(kept | dropped) and kept.any() and dropped.any()
  assert np.array_equal(efficientnet.drop_connect(x, 0.25, False), x)


def test_drop_connect_rate_grows_with_the_block_index():
  _, specs, _ = efficientnet.block_specs('B0', drop_connect_rate=0.2)
  np.testing.assert_allclose([s.drop_connect_rate for s in specs], 0.2 * np.arange(16) / 16)
  # Identity skips (and so drop-connect) only where stride 1 keeps the channels.
  assert [s.has_skip for s in specs] == [
    False, False, True, False, True, False, True, True, False, True, True, False, True,
    True, True, False,
  ]  # fmt: skip


def test_sync_all_equals_the_whole_batch_on_one_device(b0):
  """bn_sync='all' on 8 devices: the outputs and moving statistics of one device with the
  whole batch, through every batch norm of the network ('none' and 'tpu' are checked
  per layer in test_batchnorm.py)."""
  _, params, state, _, _ = b0
  devices = jax.devices()[:8]
  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, SIZE, SIZE, 3)), jnp.float32)
  mesh = Mesh(np.array(devices), ('batch',))

  def sharded(bn_sync):
    model = transformed('B0', 10, bn_sync=bn_sync, drop_rate=0.0, drop_connect_rate=0.0)

    def per_device(p, s, xs):
      out, s = model.apply(p, s, None, xs, True)
      return out['pool'], jax.tree.map(lambda a: a[None], s)

    f = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec('batch')),
      out_specs=PartitionSpec('batch'),
    )
    return jax.jit(f)(params, state, x)

  whole, whole_state = jax.jit(
    transformed('B0', 10, drop_rate=0.0, drop_connect_rate=0.0).apply, static_argnums=4
  )(params, state, None, x, True)
  pool, synced_state = sharded('all')
  np.testing.assert_allclose(pool, whole['pool'], rtol=2e-3, atol=2e-4)
  for module, stats in whole_state.items():
    for name, value in stats.items():
      got = synced_state[module][name]
      np.testing.assert_allclose(got, np.broadcast_to(value, got.shape), rtol=2e-3, atol=2e-4)


def test_width_multiplies_the_variant_coefficient():
  """B0 at width 0.5: every channel count is round_filters(c * 0.5), worked by hand."""

  def forward(x):
    return efficientnet.EfficientNet(10, 'B0', width=0.5)(x, True)

  f = hk.transform_with_state(forward)
  params, _ = jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
  # 32 16 24 40 80 112 192 320 1280 halved: 16 8 12->16 20->24 40 56 96 160 640.
  assert params['EfficientNet/~/stem_conv']['w'].shape == (3, 3, 3, 16)
  assert params['EfficientNet/~/mb_conv_block/~/project_conv']['w'].shape == (1, 1, 16, 8)
  last = len(efficientnet.block_specs('B0')[1]) - 1
  project = params[f'EfficientNet/~/mb_conv_block_{last}/~/project_conv']['w']
  assert project.shape == (1, 1, 96 * 6, 160)
  assert params['EfficientNet/~/head_conv']['w'].shape == (1, 1, 160, 640)
  assert params['EfficientNet/~/linear']['w'].shape == (640, 10)
  assert efficientnet.count_flops('B0', SIZE, 10, width=0.5).params == num_params(params)
  with pytest.raises(ValueError, match='width'):
    efficientnet.block_specs('B0', width=0.0)
