"""Checkpointing for the training loop: a thin layer over Orbax.

``Checkpointer`` wraps :class:`orbax.checkpoint.CheckpointManager` and adds the
guarantees a training script needs on top of it:

* **A workdir belongs to one model.**  The first time a workdir is used, a
  JSON *model signature* (family, variant, width, number of classes, ...) is
  written to ``<workdir>/model_signature.json``.  Opening the same workdir for a
  different model raises :class:`CheckpointMismatchError` at construction time,
  before anything is written, deleted or overwritten, and the message lists
  every differing field.
* **Restores are checked.**  ``restore`` compares the shapes and dtypes stored
  in the checkpoint's metadata with the target state before reading any data,
  and names the offending parameter path (with both shapes) on a mismatch.
* **Labels keep their meaning.**  ``check_and_write_class_index`` pins label ->
  class name in ``<workdir>/class_index.json`` and refuses a resumed run whose
  dataset's classes differ.

``should_save(step)`` is the one place that decides when to save (the interval,
or a preemption notice Orbax has received); ``save`` then writes unconditionally,
so the caller can check the state (e.g. for NaNs) in between.

On-disk layout::

    <workdir>/
      model_signature.json        # written once, atomically (tmp file + rename)
      class_index.json            # label -> class name, written once, atomically
      checkpoints/
        <step>/                   # one finalized Orbax step directory
          state/                  # the train-state pytree (OCDBT/tensorstore)
          signature/model_signature.json   # copy of the model signature
          _CHECKPOINT_METADATA
        <step>.orbax-checkpoint-tmp-<timestamp>/   # only while a save is in
                                                   # flight / after a crash

Orbax writes each step into a temporary directory and renames it to
``<step>`` only once every file is complete (on GCS it writes a
``commit_success.txt`` marker instead).  A save interrupted by a crash or a
preemption therefore leaves at most a ``*.orbax-checkpoint-tmp-*`` directory,
which ``latest_step``/``restore`` ignore and which is cleaned up the next time a
``Checkpointer`` is created; the previous checkpoint stays usable.

Multi-host: **every process must call** ``Checkpointer(...)``, ``save``,
``restore``, ``wait_until_finished`` and ``close`` with the same arguments, at
the same steps.  Orbax synchronises the processes inside these calls and lets
the primary host write the shared files; calling ``save`` on process 0 only
hangs the job.  The workdir must be visible to every host (e.g. ``gs://...``,
not a local ``/tmp``).

Typical use::

    ckpt = Checkpointer(workdir, model_signature=sig, save_interval_steps=1000)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state)          # `state` gives structure/shapes
    for step in range(int(state['step']) + 1, total_steps + 1):
      state = train_step(state, batch)
      if ckpt.should_save(step) or step == total_steps:
        ckpt.save(step, state)
    ckpt.close()
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnet_jax import fileio

__all__ = [
  'Checkpointer',
  'CheckpointMismatchError',
  'SIGNATURE_FILENAME',
  'CHECKPOINT_SUBDIR',
  'CLASS_INDEX_FILE',
  'check_and_write_class_index',
  'read_class_index',
]

SIGNATURE_FILENAME = 'model_signature.json'
CHECKPOINT_SUBDIR = 'checkpoints'
_STATE_ITEM = 'state'
_SIGNATURE_ITEM = 'signature'
_MAX_REPORTED_MISMATCHES = 20

_FIX_HINT = (
  'Nothing in the workdir was written, overwritten or deleted. To train this '
  'model, pass a fresh --workdir; to reuse this workdir for it, delete the old '
  'one deliberately first (e.g. `rm -r {workdir}`).'
)


class CheckpointMismatchError(ValueError):
  """The workdir or checkpoint belongs to a different model than requested."""


# ---------------------------------------------------------------------------
# Model signature helpers.
# ---------------------------------------------------------------------------


def _normalize_signature(signature: Mapping[str, Any]) -> dict[str, Any]:
  """JSON round trip, so that tuples/lists and numpy scalars compare equal."""
  if not isinstance(signature, Mapping):
    raise TypeError(f'model_signature must be a dict, got {type(signature).__name__}.')

  def default(obj):
    if isinstance(obj, np.generic):
      return obj.item()
    raise TypeError(
      f'model_signature value {obj!r} of type {type(obj).__name__} is not '
      'JSON-serialisable; use str/int/float/bool/None/list/dict values.'
    )

  return json.loads(json.dumps(signature, sort_keys=True, default=default))


def _flatten_signature(sig: Mapping[str, Any], prefix: str = '') -> dict:
  flat = {}
  for key, value in sig.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      flat.update(_flatten_signature(value, prefix=name + '.'))
    else:
      flat[name] = value
  return flat


_MISSING = object()


def _signature_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
  """Returns one human-readable line per differing (flattened) field."""
  flat_stored = _flatten_signature(stored)
  flat_requested = _flatten_signature(requested)
  lines = []
  for key in sorted(set(flat_stored) | set(flat_requested)):
    a = flat_stored.get(key, _MISSING)
    b = flat_requested.get(key, _MISSING)
    if a is _MISSING:
      lines.append(f'  {key}: not in the stored signature, requested {b!r}')
    elif b is _MISSING:
      lines.append(f'  {key}: stored {a!r}, not in the requested signature')
    elif a != b or isinstance(a, bool) != isinstance(b, bool):
      lines.append(f'  {key}: stored {a!r}, requested {b!r}')
  return lines


def _finalized_step_dirs(ckpt_dir: epath.Path) -> list[int]:
  """Step numbers of finalized step directories (tmp dirs are skipped)."""
  if not ckpt_dir.exists():
    return []
  steps = []
  for child in ckpt_dir.iterdir():
    if child.name.isdigit() and child.is_dir():
      steps.append(int(child.name))
  return sorted(steps)


# ---------------------------------------------------------------------------
# Pytree helpers.
# ---------------------------------------------------------------------------


def _key_component(key) -> str:
  """A path component that is the same for a NamedTuple and its metadata."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _is_prng_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(state):
  """Host-local jax arrays -> numpy; typed PRNG keys -> their uint32 data.

  Orbax refuses to save process-local `jax.Array`s in a multi-host job, while
  numpy arrays are written by the primary host only, which is what we want
  for replicated (identical on every host) train state. Global sharded
  arrays are passed through and written shard by shard by Orbax.
  """
  leaves, treedef = jax.tree.flatten(state)
  leaves = [jax.random.key_data(x) if _is_prng_key(x) else x for x in leaves]
  local = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and x.is_fully_addressable]
  # One device_get for all leaves, so the transfers overlap.
  for i, value in zip(local, jax.device_get([leaves[i] for i in local])):
    leaves[i] = value
  leaves = [np.asarray(x) if isinstance(x, (bool, int, float, np.generic)) else x for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def _leaf_shape_dtype(x):
  """(shape, dtype) the checkpoint must hold for target leaf `x`."""
  if _is_prng_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    return tuple(data.shape), np.dtype(data.dtype)
  if isinstance(x, bool):
    return (), np.dtype(bool)
  if isinstance(x, (int, float)):
    return (), None  # Python scalars: any stored numeric dtype is fine.
  return tuple(x.shape), np.dtype(x.dtype)


class Checkpointer:
  """Saves and restores the train state under ``<workdir>/checkpoints``.

  Args:
    workdir: run directory (local path or ``gs://...``) shared by all hosts.
    model_signature: JSON-able dict describing the model. Stored in
      ``<workdir>/model_signature.json`` on first use; a workdir holding a
      different signature (or checkpoints saved with one) raises
      :class:`CheckpointMismatchError` here, before anything is written.
    max_to_keep: number of most recent checkpoints kept on disk.
    save_interval_steps: ``should_save(step)`` is True when
      ``step % save_interval_steps == 0`` (or on preemption).
    async_save: write in a background thread; ``save`` returns once the
      arrays have been copied to host memory (host-local device arrays are
      fetched with one ``jax.device_get``).

  Every process of a multi-host job must construct the Checkpointer and call
  ``save``/``restore``/``close`` (see the module docstring).
  """

  def __init__(
    self,
    workdir: str,
    *,
    model_signature: dict,
    max_to_keep: int = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
  ):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}.')
    if save_interval_steps < 1:
      raise ValueError(f'save_interval_steps must be >= 1, got {save_interval_steps}.')
    # Orbax refuses relative paths (the quickstart's `--workdir workdirs/digits` is one).
    self._workdir = epath.Path(workdir if fileio.is_remote(workdir) else os.path.abspath(workdir))
    self._ckpt_dir = self._workdir / CHECKPOINT_SUBDIR
    self._signature_path = self._workdir / SIGNATURE_FILENAME
    self._signature = _normalize_signature(model_signature)

    # 1. Verify the workdir before touching it.
    stored = self._stored_signature()
    if stored is not None:
      diffs = _signature_differences(stored[0], self._signature)
      if diffs:
        raise CheckpointMismatchError(
          f'Workdir {workdir} holds a different model (signature read from '
          f'{stored[1]}) than the one requested. Differing fields:\n'
          + '\n'.join(diffs)
          + '\n'
          + _FIX_HINT.format(workdir=workdir)
        )

    # 2. Claim it: the primary process writes the signature once.
    if jax.process_index() == 0:
      self._ckpt_dir.mkdir(parents=True, exist_ok=True)
      if not self._signature_path.exists():
        fileio.atomic_write_text(
          str(self._signature_path), json.dumps(self._signature, indent=2, sort_keys=True) + '\n'
        )

    # 3. The Orbax manager.
    policy = ocp.checkpoint_managers.AnySavePolicy(
      [
        ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_decision_policy=policy,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self._ckpt_dir,
      item_names=(_STATE_ITEM, _SIGNATURE_ITEM),
      item_handlers={
        _STATE_ITEM: ocp.StandardCheckpointHandler(),
        _SIGNATURE_ITEM: ocp.JsonCheckpointHandler(filename=SIGNATURE_FILENAME),
      },
      options=options,
    )

  # -- signature ------------------------------------------------------------

  def _stored_signature(self) -> tuple[dict, str] | None:
    """(signature, where it was read from) or None for an unused workdir."""
    if self._signature_path.exists():
      try:
        return json.loads(self._signature_path.read_text()), str(self._signature_path)
      except json.JSONDecodeError as e:
        raise CheckpointMismatchError(
          f'{self._signature_path} is not valid JSON ({e}); cannot verify '
          'which model this workdir belongs to. ' + _FIX_HINT.format(workdir=self._workdir)
        ) from e
    steps = _finalized_step_dirs(self._ckpt_dir)
    if not steps:
      return None
    # Signature file lost, but checkpoints exist: every step carries a copy.
    for step in reversed(steps):
      sig_file = self._ckpt_dir / str(step) / _SIGNATURE_ITEM / SIGNATURE_FILENAME
      try:
        return json.loads(sig_file.read_text()), str(sig_file)
      except (OSError, json.JSONDecodeError):
        continue
    raise CheckpointMismatchError(
      f'{self._ckpt_dir} holds checkpoints (steps {steps}) but no model '
      f'signature ({self._signature_path} is missing and none of the '
      f'checkpoints has a readable <step>/{_SIGNATURE_ITEM}/'
      f'{SIGNATURE_FILENAME}); cannot verify that they belong to the '
      'requested model. ' + _FIX_HINT.format(workdir=self._workdir)
    )

  # -- queries --------------------------------------------------------------

  def latest_step(self) -> int | None:
    """Newest finalized step, or None. Unfinished saves are ignored."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # -- save -----------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    """Whether to save at `step`: at the save interval, or when a preemption
    notice has arrived (Orbax syncs that decision across hosts), unless `step`
    is saved already. Must be called on every process at every step."""
    step = int(step)
    return step not in self._manager.all_steps() and self._manager.should_save(step)

  def save(self, step: int, state) -> bool:
    """Saves `state` at `step` (asynchronously by default); the caller decides
    when (`should_save`). Must be called on every process. A step that already
    has a checkpoint is never overwritten (returns False), so a final save right
    after a periodic one is harmless. Returns True if a save was started.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
      step,
      args=ocp.args.Composite(
        **{
          _STATE_ITEM: ocp.args.StandardSave(_to_savable(state)),
          _SIGNATURE_ITEM: ocp.args.JsonSave(self._signature),
        }
      ),
      force=True,
    )

  # -- restore --------------------------------------------------------------

  def restore(self, target_state, step: int | None = None):
    """Restores the checkpoint at `step` (default: latest).

    `target_state` supplies the tree structure, shapes and dtypes (arrays or
    `jax.ShapeDtypeStruct`s). Leaves come back with the target's type:
    numpy stays numpy, host-local jax arrays are put on the target's device,
    globally sharded arrays / `ShapeDtypeStruct`s with a sharding are read
    with that sharding, typed PRNG keys are re-wrapped.

    Raises:
      FileNotFoundError: no checkpoint at all (or not at `step`).
      CheckpointMismatchError: stored shapes/dtypes/structure differ from the
        target; the message names each parameter path and both shapes.
    """
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint found in {self._ckpt_dir}.')
    step = int(step)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
        f'No checkpoint for step {step} in {self._ckpt_dir}; available: {self.all_steps()}.'
      )

    self._check_against_metadata(target_state, step)

    def restore_item(x):
      if _is_prng_key(x):
        x = jax.eval_shape(jax.random.key_data, x)
        return np.empty(x.shape, x.dtype)
      if isinstance(x, (bool, int, float)):
        return np.asarray(x)
      if isinstance(x, jax.ShapeDtypeStruct):
        if getattr(x, 'sharding', None) is not None:
          return x
        return np.empty(x.shape, x.dtype)
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      # Host-local (numpy or single-process jax.Array): read as numpy. The
      # np.empty placeholder only carries shape/dtype; its pages are never
      # touched.
      return np.empty(tuple(x.shape), x.dtype)

    item = jax.tree.map(restore_item, target_state)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        **{
          _STATE_ITEM: ocp.args.StandardRestore(item),
        }
      ),
    )[_STATE_ITEM]

    def finish(target, value):
      if _is_prng_key(target):
        data = jax.device_put(np.asarray(value), target.sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(target))
      if isinstance(target, bool):
        return bool(np.asarray(value))
      if isinstance(target, (int, float)):
        return type(target)(np.asarray(value).item())
      if isinstance(target, jax.Array) and target.is_fully_addressable:
        return jax.device_put(np.asarray(value), target.sharding)
      return value

    return jax.tree.map(finish, target_state, restored)

  def _check_against_metadata(self, target_state, step: int) -> None:
    metadata = self._manager.item_metadata(step)[_STATE_ITEM]
    tree = getattr(metadata, 'tree', metadata)

    def is_md_leaf(x):
      return hasattr(x, 'shape') and hasattr(x, 'dtype')

    stored = {}
    for path, md in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_md_leaf)[0]:
      stored[tuple(_key_component(k) for k in path)] = md

    problems = []
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(target_state)[0]:
      key = tuple(_key_component(k) for k in path)
      name = jax.tree_util.keystr(path)
      seen.add(key)
      if key not in stored:
        problems.append(f'  {name}: expected by the target but missing from the checkpoint')
        continue
      md = stored[key]
      shape, dtype = _leaf_shape_dtype(leaf)
      found_shape = tuple(getattr(md, 'shape', None) or ())
      found_dtype = getattr(md, 'dtype', None)
      found_dtype = np.dtype(found_dtype) if found_dtype is not None else None
      if found_shape != shape:
        problems.append(
          f'  {name}: expected shape {fileio.fmt_shape(shape)}, found '
          f'{fileio.fmt_shape(found_shape)} in the checkpoint'
        )
      elif dtype is not None and found_dtype is not None and found_dtype != dtype:
        problems.append(
          f'  {name}: expected dtype {dtype}, found '
          f'{found_dtype} in the checkpoint (shape '
          f'{fileio.fmt_shape(shape)})'
        )
    for key in stored:
      if key not in seen:
        problems.append(f'  {"/".join(key)}: in the checkpoint but not in the target state')
    if problems:
      more = len(problems) - _MAX_REPORTED_MISMATCHES
      shown = problems[:_MAX_REPORTED_MISMATCHES]
      if more > 0:
        shown.append(f'  ... and {more} more')
      raise CheckpointMismatchError(
        f'Checkpoint {self._ckpt_dir / str(step)} does not match the model '
        f'being restored ({len(problems)} mismatching entries):\n' + '\n'.join(shown) + '\n'
        'The checkpoint was probably written for a different model '
        'configuration; use a fresh --workdir for this model.'
      )

  # -- lifecycle ------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until any in-flight async save is finalized on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax resources (all hosts)."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


# ---------------------------------------------------------------------------
# The class index kept next to the checkpoints.
# ---------------------------------------------------------------------------

CLASS_INDEX_FILE = 'class_index.json'


def check_and_write_class_index(
  dataset: str, class_names: Sequence[str], workdir: str, *, write: bool = True
) -> None:
  """Pins label -> class name for a workdir: written on first use, checked on
  every resume.

  A checkpoint's classifier rows mean nothing without the class order they were
  trained with (an image folder's classes are sorted names: adding a class
  silently shifts every label after it). A workdir whose index differs from the
  dataset's is refused before anything in it changes. Only ``write=True``
  (process 0) writes; the write is atomic.
  """
  path = os.path.join(workdir, CLASS_INDEX_FILE)
  record = {'dataset': dataset, 'num_classes': len(class_names), 'class_names': list(class_names)}
  if not fileio.exists(path):
    if write:
      fileio.atomic_write_text(path, json.dumps(record, indent=1))
    return
  try:
    found = json.loads(fileio.read_text(path))
  except ValueError as e:
    raise ValueError(
      f'{path} is not valid JSON ({e}); restore it from a backup or use a new --workdir.'
    ) from None
  if found.get('class_names') != record['class_names']:
    old, new = found.get('class_names') or [], record['class_names']
    diff = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    raise ValueError(
      f'{workdir} was trained on {found.get("num_classes")} classes of '
      f'{found.get("dataset")!r}, but {dataset!r} now has {len(new)} classes '
      f'that differ from label {diff} on ({old[diff : diff + 1]} vs '
      f'{new[diff : diff + 1]}). Labels would silently change meaning: restore the '
      "dataset's classes, or train in a new --workdir (fine-tune from the old "
      'checkpoint to keep its weights).'
    )


def read_class_index(workdir: str) -> list[str]:
  """The class names (by label) a workdir was trained with."""
  return list(json.loads(fileio.read_text(os.path.join(workdir, CLASS_INDEX_FILE)))['class_names'])
