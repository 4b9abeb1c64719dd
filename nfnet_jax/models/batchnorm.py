"""Batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167) with cross-device statistics.

The batch-normalized baselines the NFNet paper compares against (EfficientNet in
arXiv 2102.06171 table 3) compute their statistics on several devices at once. `bn_sync`:

* 'none': each device normalizes with the statistics of its own examples.
* 'all': one mean over the whole data-parallel axis (`axis_name`): the statistics of the
  global batch, as if it ran on one device.
* 'tpu': the rule of the official TensorFlow TPU EfficientNet (tensorflow/tpu,
  models/official/efficientnet/utils.py, `TpuBatchNormalization._moments`): no
  synchronisation on up to 8 replicas; above, consecutive groups of max(8, n // 8)
  replicas share their statistics (`tpu_groups`).

Synchronised statistics average each device's mean and mean of squares (equal per-device
batches, as data parallelism gives), then var = E[x^2] - E[x]^2, as the TPU code does.
Outside a mapped axis (a single device; `init`; evaluation on one host) there is nothing
to synchronise with: 'all' and 'tpu' then compute what 'none' computes, which is the
statistics of the whole batch the call sees.
"""

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

BN_SYNCS = ('none', 'all', 'tpu')


def tpu_groups(num_replicas: int) -> Optional[list[list[int]]]:
  """The TPU EfficientNet's replica groups (`axis_index_groups`), None for no sync."""
  if num_replicas <= 8:  # the reference skips the cross-replica sum on 2x2 slices or smaller
    return None
  per_group = max(8, num_replicas // 8)
  if num_replicas % per_group:
    raise ValueError(
      f"bn_sync='tpu' needs the replica count ({num_replicas}) to be a multiple of its "
      f"group size {per_group}; use bn_sync='all' or a multiple of {per_group} devices."
    )
  return [list(range(g, g + per_group)) for g in range(0, num_replicas, per_group)]


def _axis_size(axis_name: str) -> Optional[int]:
  try:
    return jax.lax.axis_size(axis_name)
  except NameError:  # no such mapped axis: a single device
    return None


def grouped_mean(x: jax.Array, axis_name: str, groups: list[list[int]]) -> jax.Array:
  """`lax.pmean(x, axis_name, axis_index_groups=groups)` for equal-sized groups.

  jax.shard_map (this package's default mapping) does not implement
  `axis_index_groups`, so each device writes `x` into its group's slot of a
  [num_groups, ...] buffer, one psum adds the slots up, and each device reads its own.
  """
  group_of = np.zeros(sum(map(len, groups)), np.int32)  # replica index -> its group
  for g, members in enumerate(groups):
    group_of[members] = g
  mine = jnp.asarray(group_of)[jax.lax.axis_index(axis_name)]
  one_hot = jax.nn.one_hot(mine, len(groups), dtype=x.dtype)
  slots = jax.lax.psum(one_hot.reshape((-1,) + (1,) * x.ndim) * x, axis_name)
  return slots[mine] / len(groups[0])


class BatchNorm(hk.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + offset, over every axis but the last.

  Training: batch statistics (synchronised per `bn_sync`), and the moving averages
  `moving = decay * moving + (1 - decay) * batch` are updated (Haiku state; the
  variance is the biased batch variance, as the TF reference's non-fused layer keeps).
  Evaluation: the moving averages. Statistics and normalization run in float32.
  """

  def __init__(
    self,
    decay: float,
    eps: float,
    bn_sync: str = 'none',
    axis_name: str = 'batch',
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    if bn_sync not in BN_SYNCS:
      raise ValueError(f'Unknown bn_sync {bn_sync!r}; valid: {", ".join(BN_SYNCS)}.')
    self.decay, self.eps, self.bn_sync, self.axis_name = decay, eps, bn_sync, axis_name

  def _batch_stats(self, x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    axes = tuple(range(x32.ndim - 1))
    mean = jnp.mean(x32, axis=axes)
    mean_sq = jnp.mean(jnp.square(x32), axis=axes)
    n = _axis_size(self.axis_name) if self.bn_sync != 'none' else None
    if n is None:
      return mean, jnp.mean(jnp.square(x32 - mean), axis=axes)
    stats = jnp.stack([mean, mean_sq])
    if self.bn_sync == 'all':
      stats = jax.lax.pmean(stats, self.axis_name)
    elif (groups := tpu_groups(n)) is not None:
      stats = grouped_mean(stats, self.axis_name, groups)
    mean, mean_sq = stats
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    channels = x.shape[-1]
    scale = hk.get_parameter('scale', (channels,), x.dtype, init=jnp.ones)
    offset = hk.get_parameter('offset', (channels,), x.dtype, init=jnp.zeros)
    moving_mean = hk.get_state('moving_mean', (channels,), jnp.float32, init=jnp.zeros)
    moving_var = hk.get_state('moving_variance', (channels,), jnp.float32, init=jnp.ones)
    x32 = x.astype(jnp.float32)
    if is_training:
      mean, var = self._batch_stats(x32)
      hk.set_state('moving_mean', self.decay * moving_mean + (1 - self.decay) * mean)
      hk.set_state('moving_variance', self.decay * moving_var + (1 - self.decay) * var)
    else:
      mean, var = moving_mean.astype(jnp.float32), moving_var.astype(jnp.float32)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    return (y + offset.astype(jnp.float32)).astype(x.dtype)
