"""BatchNorm: the statistics, the moving averages, and cross-device sync on 8 CPU devices."""

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
import numpy as np
import pytest

from nfnet_jax.models import batchnorm

DECAY, EPS = 0.9, 1e-3
DEVICES = 8


def bn_fn(bn_sync='none'):
  def f(x, is_training):
    return batchnorm.BatchNorm(DECAY, EPS, bn_sync=bn_sync, name='bn')(x, is_training)

  return hk.without_apply_rng(hk.transform_with_state(f))


def reference(x, scale, offset, mean=None, var=None):
  """NumPy batch norm over all axes but the last (batch statistics unless given)."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes) if mean is None else mean
  var = x.var(axes) if var is None else var
  return (x - mean) / np.sqrt(var + EPS) * scale + offset, mean, var


def random_setup(seed=0, shape=(DEVICES * 4, 3, 3, 5)):
  rng = np.random.default_rng(seed)
  # Per-example offsets make the device shards' statistics differ clearly.
  x = rng.normal(size=shape) * 2 + rng.normal(size=(shape[0], 1, 1, 1)) * 3 + 1
  model = bn_fn()
  params, state = model.init(None, jnp.asarray(x, jnp.float32), True)
  params = {
    'bn': {'scale': jnp.asarray(rng.uniform(0.5, 2, 5)), 'offset': jnp.asarray(rng.normal(size=5))}
  }
  state = {
    'bn': {
      'moving_mean': jnp.asarray(rng.normal(size=5), jnp.float32),
      'moving_variance': jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
    }
  }
  return x.astype(np.float32), params, state


@pytest.mark.parametrize(
  'n, expected',
  [
    (1, None),
    (2, None),
    (8, None),
    (16, [list(range(0, 8)), list(range(8, 16))]),
    (
      32,
      [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [8, 9, 10, 11, 12, 13, 14, 15],
        [16, 17, 18, 19, 20, 21, 22, 23],
        [24, 25, 26, 27, 28, 29, 30, 31],
      ],
    ),  # fmt: skip
    (64, [list(range(8 * g, 8 * g + 8)) for g in range(8)]),
    (128, [list(range(16 * g, 16 * g + 16)) for g in range(8)]),  # 128 // 8 = 16 > 8
  ],
)
def test_tpu_groups(n, expected):
  assert batchnorm.tpu_groups(n) == expected


def test_tpu_groups_refuses_uneven_counts():
  with pytest.raises(ValueError, match='multiple of its group size 8'):
    batchnorm.tpu_groups(12)


def test_unknown_sync_is_refused():
  with pytest.raises(ValueError, match='Unknown bn_sync'):
    bn_fn('sometimes').init(None, jnp.ones((2, 1, 1, 3)), True)


@pytest.mark.parametrize('bn_sync', batchnorm.BN_SYNCS)
def test_training_uses_batch_statistics_and_updates_moving_averages(bn_sync):
  # Unmapped, every sync mode sees one device: the statistics of the batch it is given.
  x, params, state = random_setup()
  y, new_state = bn_fn(bn_sync).apply(params, state, x, True)
  s, o = np.asarray(params['bn']['scale']), np.asarray(params['bn']['offset'])
  want, mean, var = reference(x, s, o)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  old = state['bn']
  for name, batch_value in (('moving_mean', mean), ('moving_variance', var)):
    want_moving = DECAY * np.asarray(old[name]) + (1 - DECAY) * batch_value
    np.testing.assert_allclose(new_state['bn'][name], want_moving, rtol=1e-5, atol=1e-5)


def test_eval_uses_moving_averages_and_leaves_them():
  x, params, state = random_setup()
  y, new_state = bn_fn().apply(params, state, x, False)
  m, v = (np.asarray(state['bn'][k]) for k in ('moving_mean', 'moving_variance'))
  want, _, _ = reference(x, params['bn']['scale'], params['bn']['offset'], m, v)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_bfloat16_inputs_get_float32_statistics():
  x, params, state = random_setup()
  xb = jnp.asarray(x, jnp.bfloat16)
  y, new_state = bn_fn().apply(params, state, xb, True)
  assert y.dtype == jnp.bfloat16
  assert new_state['bn']['moving_mean'].dtype == jnp.float32
  # The statistics of the bf16 values themselves, computed in float64.
  _, mean, var = reference(np.asarray(xb.astype(jnp.float32)), 1.0, 0.0)
  got_var = (new_state['bn']['moving_variance'] - DECAY * state['bn']['moving_variance']) / (
    1 - DECAY
  )
  np.testing.assert_allclose(got_var, var, rtol=1e-4)


def sharded_apply(model, params, state, x, is_training=True):
  """Apply on DEVICES CPU devices, batch split on a mesh axis 'batch'; outputs per device."""
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ('batch',))

  def per_device(p, s, xs):
    y, s = model.apply(p, s, xs, is_training)
    return jax.tree.map(lambda a: a[None], (y, s))

  f = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec('batch')),
    out_specs=PartitionSpec('batch'),
  )
  y, s = jax.jit(f)(params, state, x)
  return np.asarray(y).reshape(x.shape), jax.tree.map(np.asarray, s)


def per_group_reference(x, params, state, groups):
  """Outputs and moving stats when each group of devices shares its examples' statistics."""
  shards = np.split(x, DEVICES)
  s, o = np.asarray(params['bn']['scale']), np.asarray(params['bn']['offset'])
  ys, means, vars_ = [None] * DEVICES, [None] * DEVICES, [None] * DEVICES
  for members in groups:
    _, mean, var = reference(np.concatenate([shards[i] for i in members]), s, o)
    for i in members:
      ys[i] = reference(shards[i], s, o, mean, var)[0]
      means[i] = DECAY * np.asarray(state['bn']['moving_mean']) + (1 - DECAY) * mean
      vars_[i] = DECAY * np.asarray(state['bn']['moving_variance']) + (1 - DECAY) * var
  return np.concatenate(ys), np.stack(means), np.stack(vars_)


def check_against(got, want):
  y, s = got
  want_y, want_mean, want_var = want
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s['bn']['moving_mean'], want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(s['bn']['moving_variance'], want_var, rtol=1e-4, atol=1e-5)


def test_sync_all_equals_the_whole_batch_on_one_device():
  x, params, state = random_setup()
  got = sharded_apply(bn_fn('all'), params, state, x)
  check_against(got, per_group_reference(x, params, state, [list(range(DEVICES))]))
  # And the same as the unmapped module on the whole batch.
  y1, s1 = bn_fn('none').apply(params, state, x, True)
  np.testing.assert_allclose(got[0], y1, rtol=1e-4, atol=1e-4)
  for device_state in got[1]['bn']['moving_variance']:
    np.testing.assert_allclose(device_state, s1['bn']['moving_variance'], rtol=1e-4)


@pytest.mark.parametrize('bn_sync', ['none', 'tpu'])  # 'tpu' does not sync up to 8 replicas
def test_unsynced_modes_use_each_devices_own_statistics(bn_sync):
  x, params, state = random_setup()
  got = sharded_apply(bn_fn(bn_sync), params, state, x)
  check_against(got, per_group_reference(x, params, state, [[i] for i in range(DEVICES)]))
  y_whole, _ = bn_fn('none').apply(params, state, x, True)
  assert np.abs(got[0] - np.asarray(y_whole)).max() > 0.1


def test_tpu_mode_shares_statistics_within_its_groups(monkeypatch):
  # Groups as 64 replicas would have them, scaled down to 8 devices: pairs, and a
  # non-contiguous grouping to show the membership is followed, not assumed.
  x, params, state = random_setup()
  for groups in ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]):
    monkeypatch.setattr(batchnorm, 'tpu_groups', lambda n, groups=groups: groups)
    got = sharded_apply(bn_fn('tpu'), params, state, x)
    check_against(got, per_group_reference(x, params, state, groups))


def test_grouped_mean_equals_pmean_with_axis_index_groups():
  groups = [[0, 5, 2, 7], [4, 1, 6, 3]]
  x = jnp.asarray(np.random.default_rng(1).normal(size=(DEVICES, 3)), jnp.float32)
  devices = jax.devices()[:DEVICES]
  want = jax.pmap(
    lambda v: jax.lax.pmean(v, 'batch', axis_index_groups=groups), 'batch', devices=devices
  )(x)
  mesh = Mesh(np.array(devices), ('batch',))
  got = jax.jit(
    jax.shard_map(
      lambda v: batchnorm.grouped_mean(v[0], 'batch', groups)[None],
      mesh=mesh,
      in_specs=PartitionSpec('batch'),
      out_specs=PartitionSpec('batch'),
    )
  )(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)
