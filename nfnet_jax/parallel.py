"""Mapping the per-device steps over devices, and what a host needs to know about them.

The per-device steps in train.py are pure functions that reduce across the
`AXIS` named axis. Here they are mapped over the local devices with `jax.pmap`.
The train state is replicated but passed *un-stacked* (`in_axes=None`,
`out_axes=None`): under the current pmap (built on jit + shard_map), stacking
copies and reading `x[0]` would gather every replica to one device each step.
Since NFNets have no batch-norm, nothing but the gradient (and the metrics)
crosses devices.
"""

import collections
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

AXIS = 'batch'  # name of the data-parallel axis used by lax.pmean / psum


def local_devices(num_devices: Optional[int] = None) -> list:
  devices = jax.local_devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
        f'Asked for {num_devices} devices but this process has {len(devices)}: {devices}.'
      )
    devices = devices[:num_devices]
  return devices


def _pmap_devices(devices: Sequence) -> Optional[Sequence]:
  # With several processes, pmap must span every device of every process:
  # given only this process's devices, lax.pmean/psum would silently reduce
  # within the host and the hosts' replicas would drift apart.
  if jax.process_count() > 1:
    if len(devices) != jax.local_device_count():
      raise ValueError('Multi-process runs use every local device; unset num_devices.')
    return None
  return devices


def map_train_step(step_fn: Callable, devices: Sequence) -> Callable:
  """(state, batch) -> (state, metrics): state replicated, batch split on axis 0.

  Pass a state placed by `replicate` (as the step returns it): the buffers are
  donated, so the update happens in place on each device.
  """
  return jax.pmap(
    step_fn,
    axis_name=AXIS,
    in_axes=(None, 0),
    out_axes=(None, None),
    donate_argnums=(0,),
    devices=_pmap_devices(devices),
  )


def map_eval_step(step_fn: Callable, devices: Sequence) -> Callable:
  """(params, ema_params, batch) -> summed metrics, identical on every device."""
  return jax.pmap(
    step_fn, axis_name=AXIS, in_axes=(None, None, 0), out_axes=None, devices=_pmap_devices(devices)
  )


def replicated_sharding(devices: Sequence) -> NamedSharding:
  """One full copy on each device the steps run on (every process's, in a pod)."""
  all_devices = jax.devices() if jax.process_count() > 1 else list(devices)
  return NamedSharding(Mesh(np.asarray(all_devices), (AXIS,)), PartitionSpec())


def replicate(tree, devices: Sequence):
  """Places identical per-process values on every device, as the steps return them.

  The mapped steps return their state in exactly this layout, so a replicated
  state is donated in place and the step compiles once (a state on a single
  device would be copied each call, and the second call would recompile).
  """
  return jax.device_put(tree, replicated_sharding(devices))


def batch_sharding(devices: Sequence) -> NamedSharding:
  """Leading axis split over the devices the steps run on (every process's, in a pod)."""
  all_devices = jax.devices() if jax.process_count() > 1 else list(devices)
  return NamedSharding(Mesh(np.asarray(all_devices), (AXIS,)), PartitionSpec(AXIS))


def prefetch_to_devices(batches: Iterable, devices: Sequence, size: int = 2) -> Iterator:
  """Yields the batches already on the devices, with up to `size` of them there at once.

  `jax.device_put` is asynchronous, so the next batches' host-to-device copies run
  while the current step computes. Each process passes its local
  [local_devices, per_device, ...] batch; in a pod the pieces form one global array
  over every device (`make_array_from_process_local_data`), which the pmapped steps
  take without another copy.
  """
  sharding = batch_sharding(devices)
  if jax.process_count() > 1:
    put = lambda batch: jax.tree.map(  # noqa: E731
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch
    )
  else:
    put = lambda batch: jax.device_put(batch, sharding)  # noqa: E731
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def per_device_batch_size(global_batch: int, num_local_devices: int) -> int:
  """Splits the global batch over every device of every process, or says why not."""
  total_devices = num_local_devices * jax.process_count()
  if global_batch % total_devices:
    raise ValueError(
      f'The global batch size {global_batch} does not divide over {total_devices} '
      f'devices ({jax.process_count()} processes x {num_local_devices} local). '
      f'Use a multiple of {total_devices}, e.g. --config.train.batch_size='
      f'{max(1, global_batch // total_devices) * total_devices}.'
    )
  return global_batch // total_devices


def to_host(tree):
  """Fetches device values (replicated or not) as NumPy, for logging."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
