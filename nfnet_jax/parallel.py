"""Mapping the per-device steps over devices, and what a host needs to know about them.

The per-device steps (steps.py) are pure functions that reduce across the `AXIS` named
axis. Here they are mapped over the devices in one of two ways, with the same step body:

* `mode='shard_map'`: `jax.jit` of `jax.shard_map` over a one-axis `Mesh` named `AXIS`
  (`mesh(devices)`: every process's devices in a multi-process run), state replicated
  (`P()`), batch split on its leading device axis (`P(AXIS)`), outputs `P()`.
* `mode='pmap'`: `jax.pmap` with the state passed *un-stacked* (`in_axes=None`,
  `out_axes=None`): stacking would copy, and reading `x[0]` would gather every replica to
  one device each step.

Default: 'shard_map'. `jax.pmap` is the legacy API in current JAX (its docstring points
to `jax.shard_map`), and in the JAX versions this package runs on (0.10, 0.12) pmap is
itself a jit of a shard_map with the settings used here (`check_vma=False`, the device
axis squeezed inside), so both modes compile the same program and give bit-identical
results. Measured on 8 CPU devices (2 shared cores, so noisy): the digits F0 (1/8
width, 32 px, 8 images/device, float32) took 172 and 208 ms/step under pmap, 204 and
167 ms/step under shard_map (two alternating runs of 30 steps each); a trivial step on
the same 702-leaf train state, which measures dispatch alone, took 15.5-19.1 ms under
pmap and 15.6-16.1 ms under shard_map. What differs is the call: pmap re-derives its
mesh and in_axes (and, in a pod, converts host-local and global arrays) in Python on
every call, while the jitted shard_map takes the global arrays that `replicate` and
`prefetch_to_devices` already make, on the mesh they are built on. `config.parallel`
selects the mode for training.

Both modes take the same layouts: the state as `replicate` places it (the steps return
it in exactly that layout, so a donated state is updated in place and the step compiles
once) and the batch as `prefetch_to_devices` places it ([devices, per_device, ...]
split on axis 0; in a pod one global array over every process's devices). Since NFNets
have no batch-norm, nothing but the gradient (and the metrics) crosses devices
(arXiv 2102.06171 section 1); the batch-normalised baselines also share their batch
statistics (`bn_sync`) and average their moving statistics (steps.make_train_step), which
keeps their replicated state identical on every device.
"""

import collections
import inspect
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

AXIS = 'batch'  # name of the data-parallel axis used by lax.pmean / psum
MODES = ('shard_map', 'pmap')
DEFAULT_MODE = 'shard_map'


def pmean(tree):
  """`lax.pmean` over `AXIS`, inside a mapped step; the tree itself when the axis has one
  device. The axis size is static, and XLA's CPU backend runs a one-device all-reduce as
  a copy of every buffer (for F0's gradients, 286 MB each step)."""
  if jax.lax.axis_size(AXIS) == 1:
    return tree
  return jax.lax.pmean(tree, AXIS)


def local_devices(num_devices: Optional[int] = None) -> list:
  devices = jax.local_devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
        f'Asked for {num_devices} devices but this process has {len(devices)}: {devices}.'
      )
    devices = devices[:num_devices]
  return devices


def _check_devices(devices: Sequence) -> None:
  # With several processes, the steps must span every device of every process: given
  # only some of this process's devices, lax.pmean/psum would reduce over a different
  # set on each host and the hosts' replicas would drift apart.
  if jax.process_count() > 1 and len(devices) != jax.local_device_count():
    raise ValueError('Multi-process runs use every local device; unset num_devices.')


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'Unknown parallel mode {mode!r}; valid: {", ".join(MODES)}.')


def mesh(devices: Sequence) -> Mesh:
  """The one-axis mesh (named `AXIS`) the steps run on: `devices` in a single process,
  every process's devices (`jax.devices()`) in a multi-process run.

  Its axis is `AxisType.Auto` (what `Mesh` gives by default, and the kind of mesh pmap
  builds internally), not the `Explicit` axis `jax.make_mesh` defaults to: the steps
  are manual over the axis anyway, and with one kind of mesh a state placed for either
  mode is taken by the other without a copy.
  """
  all_devices = jax.devices() if jax.process_count() > 1 else list(devices)
  axis_type = getattr(jax.sharding, 'AxisType', None)
  if axis_type is None:  # JAX before explicit sharding: every axis is automatic
    return Mesh(np.asarray(all_devices), (AXIS,))
  return Mesh(np.asarray(all_devices), (AXIS,), axis_types=(axis_type.Auto,))


def _shard_map(fn: Callable, data_mesh: Mesh, in_specs, out_specs) -> Callable:
  """`jax.shard_map` with per-device semantics, across the JAX versions we support.

  The step bodies are written per device, as under pmap: each device differentiates
  its own loss and `pmean`s the gradient itself. With varying-manual-axes checking on
  (`check_vma=True`, the default), shard_map instead treats the replicated params as
  device-invariant, and the transpose of their implicit broadcast sums the gradients
  over devices before the step's own pmean sees them (a gradient 8x too large on 8
  devices). pmap sets the check off for the same reason. Older JAX calls the flag
  `check_rep` and has shard_map only in jax.experimental.
  """
  if hasattr(jax, 'shard_map'):
    shard_map = jax.shard_map
  else:  # older JAX
    from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  params = inspect.signature(shard_map).parameters
  check = {'check_vma': False} if 'check_vma' in params else {'check_rep': False}
  return shard_map(fn, mesh=data_mesh, in_specs=in_specs, out_specs=out_specs, **check)


def _map_with_shard_map(
  step_fn: Callable, devices: Sequence, batched: Sequence[bool], num_outputs: int, donate
) -> Callable:
  """jit(shard_map(step_fn)): arguments flagged in `batched` split on their leading axis
  (squeezed inside, so the body sees one device's batch as under pmap), the others and
  every output replicated."""
  data_mesh = mesh(devices)
  replicated, split = PartitionSpec(), PartitionSpec(AXIS)
  in_specs = tuple(split if b else replicated for b in batched)

  def per_device(*args):
    args = [
      jax.tree.map(lambda x: jax.lax.squeeze(x, (0,)), a) if b else a for a, b in zip(args, batched)
    ]
    return step_fn(*args)

  out_specs = replicated if num_outputs == 1 else (replicated,) * num_outputs
  sharded = _shard_map(per_device, data_mesh, in_specs, out_specs)
  sharding = lambda spec: NamedSharding(data_mesh, spec)  # noqa: E731
  return jax.jit(
    sharded,
    in_shardings=tuple(sharding(spec) for spec in in_specs),
    out_shardings=jax.tree.map(sharding, out_specs),
    donate_argnums=donate,
  )


def _pmap_devices(devices: Sequence) -> Optional[Sequence]:
  # Given a device list, pmap maps over those devices only; in a multi-process run it
  # must span every process's devices, which it does when given none.
  return None if jax.process_count() > 1 else devices


def map_train_step(
  step_fn: Callable, devices: Sequence, mode: str = DEFAULT_MODE, num_extra_args: int = 0
) -> Callable:
  """(state, batch, *extra) -> (state, metrics): state replicated, batch split on axis 0.

  `mode` is 'shard_map' or 'pmap' (module docstring). Pass a state placed by
  `replicate` (as the step returns it): the buffers are donated, so the update happens
  in place on each device. The batch is [devices, per_device, ...]; under shard_map in
  a multi-process run it must be the global array `prefetch_to_devices` makes (pmap
  also takes each process's local NumPy piece). `num_extra_args` more arguments
  (e.g. a distillation teacher's parameters) are replicated like the state and never
  donated: pass them placed by `replicate`, so they are arguments of the compiled
  step rather than constants baked into it.
  """
  _check_mode(mode)
  _check_devices(devices)
  extra = num_extra_args
  if mode == 'shard_map':
    return _map_with_shard_map(step_fn, devices, (False, True) + (False,) * extra, 2, donate=(0,))
  return jax.pmap(
    step_fn,
    axis_name=AXIS,
    in_axes=(None, 0) + (None,) * extra,
    out_axes=(None, None),
    donate_argnums=(0,),
    devices=_pmap_devices(devices),
  )


def map_eval_step(step_fn: Callable, devices: Sequence, mode: str = DEFAULT_MODE) -> Callable:
  """(params, ema_params, batch, model_states=({}, {})) -> summed metrics, identical on
  every device; arguments laid out as for `map_train_step` (nothing is donated), the
  model states (batch norm's moving averages for params and ema_params) replicated."""
  _check_mode(mode)
  _check_devices(devices)
  if mode == 'shard_map':
    mapped = _map_with_shard_map(step_fn, devices, (False, False, True, False), 1, donate=())
  else:
    mapped = jax.pmap(
      step_fn,
      axis_name=AXIS,
      in_axes=(None, None, 0, None),
      out_axes=None,
      devices=_pmap_devices(devices),
    )

  def eval_step(params, ema_params, batch, model_states=({}, {})):
    return mapped(params, ema_params, batch, model_states)

  return eval_step


def replicated_sharding(devices: Sequence) -> NamedSharding:
  """One full copy on each device the steps run on (every process's, in a pod)."""
  return NamedSharding(mesh(devices), PartitionSpec())


def replicate(tree, devices: Sequence):
  """Places identical per-process values on every device, as the steps return them.

  The mapped steps return their state in exactly this layout, so a replicated
  state is donated in place and the step compiles once (a state on a single
  device would be copied each call, and the second call would recompile).
  """
  return jax.device_put(tree, replicated_sharding(devices))


def batch_sharding(devices: Sequence) -> NamedSharding:
  """Leading axis split over the devices the steps run on (every process's, in a pod)."""
  return NamedSharding(mesh(devices), PartitionSpec(AXIS))


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


def per_device_batch_size(
  global_batch: int, num_local_devices: int, flag: str = '--config.train.batch_size'
) -> int:
  """Splits the global batch over every device of every process, or says why not
  (naming `flag`, the setting to change)."""
  total_devices = num_local_devices * jax.process_count()
  if global_batch % total_devices:
    raise ValueError(
      f'The global batch size {global_batch} does not divide over {total_devices} '
      f'devices ({jax.process_count()} processes x {num_local_devices} local). '
      f'Use a multiple of {total_devices}, e.g. {flag}='
      f'{max(1, global_batch // total_devices) * total_devices}.'
    )
  return global_batch // total_devices


def to_host(tree):
  """Fetches device values (replicated or not) as NumPy, for logging."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
