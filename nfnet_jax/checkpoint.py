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
  and names the offending parameter path (with both shapes) on a mismatch.  When
  only the optimizer state differs, the message says so (a changed optimizer
  configuration, not a different model).
* **A damaged checkpoint costs one checkpoint, not the run.**  ``restore()``
  (no explicit step) tries the newest step first; if its files are damaged
  (truncated or overwritten data, unreadable metadata, missing files) it tries
  the next older step, and so on.  Once an older step restores, each damaged
  newer one is logged (one warning line: step, file, reason) and moved aside to
  ``<workdir>/checkpoints_damaged/<step>-<UTC time>/``, out of Orbax's view, so
  the run continues from the older step and saves the newer steps again.
  Nothing is ever deleted, and nothing is moved unless an older step was read
  successfully (an error that hits every step, e.g. a library change, moves
  nothing).  If no step restores, one :class:`CheckpointDamagedError` lists
  every step tried and why it failed.  A shape or structure mismatch is not
  damage: it raises :class:`CheckpointMismatchError` as before.  Limit: OCDBT
  stores no checksum of array data, so bytes overwritten *inside* a compressed
  chunk may decode to wrong values undetected; truncation, garbage headers and
  missing files are detected.
* **A failed save stops the run at once.**  Async saves write in a background
  thread.  ``check_saves()`` (cheap: call it every step) and ``save``,
  ``wait_until_finished`` and ``close`` raise :class:`CheckpointSaveError` as
  soon as a save has failed: one line naming the step, the directory, the
  operating-system error (e.g. ``No space left on device``), the newest
  complete checkpoint and the fix.  The unfinished step stays a
  ``*.orbax-checkpoint-tmp*`` directory that is never mistaken for a
  checkpoint, and no older checkpoint is deleted for it.
* **Readers never disturb the trainer.**  ``Checkpointer(..., read_only=True)``
  (for ``--mode eval``) creates, moves and deletes nothing: no directories, no
  ``model_signature.json``, and the trainer's in-flight
  ``<step>.orbax-checkpoint-tmp*`` directories are left alone.  It still
  checks the model signature.
* **Labels keep their meaning.**  ``check_and_write_class_index`` pins label ->
  class name in ``<workdir>/class_index.json`` and refuses a resumed run whose
  dataset's classes differ.

``should_save(step)`` is the one place that decides when to save (the interval,
or a preemption notice Orbax has received); ``save`` then writes unconditionally,
so the caller can check the state (e.g. for NaNs) in between.  One trainer per
workdir is enforced separately, by :mod:`nfnet_jax.workdir`.

On-disk layout::

    <workdir>/
      model_signature.json        # written once, atomically (tmp file + rename)
      class_index.json            # label -> class name, written once, atomically
      trainer.lock                # nfnet_jax.workdir: who is training here
      checkpoints/
        <step>/                   # one finalized Orbax step directory
          state/                  # the train-state pytree (OCDBT/tensorstore): step,
                                  # params, opt_state, ema_params, rng, and for a
                                  # batch-normalised model model_state, ema_model_state
          signature/model_signature.json   # copy of the model signature
          _CHECKPOINT_METADATA
        <step>.orbax-checkpoint-tmp*/   # only while a save is in flight, or
                                        # after a crash or a failed save
      checkpoints_damaged/
        <step>-<YYYYmmddTHHMMSSZ>/     # a damaged step, set aside by restore()

Orbax writes each step into a temporary directory and renames it to
``<step>`` only once every file is complete (on GCS it writes a
``commit_success.txt`` marker instead).  A save interrupted by a crash, a
preemption or a write error therefore leaves at most a
``*.orbax-checkpoint-tmp*`` directory, which ``latest_step``/``restore`` ignore
and which the next writing ``Checkpointer`` cleans up; the previous checkpoint
stays usable.

Multi-host: **every process must call** ``Checkpointer(...)``, ``save``,
``restore``, ``check_saves``, ``wait_until_finished`` and ``close`` with the same
arguments, at the same steps.  Orbax synchronises the processes inside these
calls and lets the primary host write the shared files; calling ``save`` on
process 0 only hangs the job.  ``restore`` agrees across processes on whether
each step is damaged (one small all-gather per step tried), and only process 0
moves a damaged step aside, behind a barrier.  A failed save raises on the
processes whose writes failed; the others stop at the job's next collective.
The workdir must be visible to every host (e.g. ``gs://...``, not a local
``/tmp``).  On GCS, moving a damaged step aside copies its objects (not atomic).

Typical use::

    ckpt = Checkpointer(workdir, model_signature=sig, save_interval_steps=1000)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state)          # `state` gives structure/shapes
    for step in range(int(state['step']) + 1, total_steps + 1):
      state = train_step(state, batch)
      ckpt.check_saves()                   # a failed async save stops here
      if ckpt.should_save(step) or step == total_steps:
        ckpt.save(step, state)
    ckpt.close()
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnet_jax import fileio

__all__ = [
  'Checkpointer',
  'CheckpointMismatchError',
  'CheckpointDamagedError',
  'CheckpointSaveError',
  'SIGNATURE_FILENAME',
  'CHECKPOINT_SUBDIR',
  'DAMAGED_SUBDIR',
  'CLASS_INDEX_FILE',
  'check_and_write_class_index',
  'read_class_index',
]

SIGNATURE_FILENAME = 'model_signature.json'
CHECKPOINT_SUBDIR = 'checkpoints'
DAMAGED_SUBDIR = 'checkpoints_damaged'
_STATE_ITEM = 'state'
_SIGNATURE_ITEM = 'signature'
_OPT_STATE_KEY = 'opt_state'
_MAX_REPORTED_MISMATCHES = 20

_FIX_HINT = (
  'Nothing in the workdir was written, overwritten or deleted. To train this '
  'model, pass a fresh --workdir; to reuse this workdir for it, delete the old '
  'one deliberately first (e.g. `rm -r {workdir}`).'
)


class CheckpointMismatchError(ValueError):
  """The workdir or checkpoint belongs to a different model than requested."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint's files cannot be read (truncated, overwritten or missing)."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (e.g. the disk is full); the run must stop."""


# ---------------------------------------------------------------------------
# Reading errors: damage or not.
# ---------------------------------------------------------------------------

# Tensorstore reports a read error as a ValueError whose message starts with an
# absl status code. These codes are what truncated, overwritten or missing
# files produce (see tests/test_checkpoint.py). Transient or environmental codes
# (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, ...)
# are deliberately absent: a network hiccup must never move a good checkpoint.
_DAMAGE_STATUS_CODES = frozenset(
  {'DATA_LOSS', 'OUT_OF_RANGE', 'FAILED_PRECONDITION', 'NOT_FOUND', 'INVALID_ARGUMENT'}
)


class _Damaged(Exception):
  """Internal: one step's files are damaged; `reason` says which and how."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _status_code(error: BaseException) -> str | None:
  match = re.match(r'([A-Z_]+): ', str(error))
  return match.group(1) if match else None


def _is_damage(error: BaseException) -> bool:
  """Whether a read error means the checkpoint's files are damaged."""
  if isinstance(error, CheckpointMismatchError):
    return False
  # Missing files (FileNotFoundError; Orbax's KeyError for a missing item) and
  # unreadable metadata (garbage bytes, a truncated JSON file).
  if isinstance(error, (FileNotFoundError, KeyError, json.JSONDecodeError, UnicodeDecodeError)):
    return True
  return isinstance(error, ValueError) and _status_code(error) in _DAMAGE_STATUS_CODES


def _short_error(error: BaseException) -> str:
  """One line: the status code, the innermost file named and the final cause.

  Tensorstore nests its context ('Error opening "zarr" driver: Error reading
  "w/.zarray" in OCDBT database at ...: Error reading ... of local file "...":
  <cause>') and appends the whole JSON spec; only the ends are useful.
  """
  text = re.sub(r'\s*\[tensorstore_spec=.*', '', str(error), flags=re.S)
  text = ' '.join(text.split())
  code = _status_code(error)
  if code is None:
    return f'{type(error).__name__}: {text}'[:400]
  files = [f for f in re.findall(r'file "([^"]+)"', text) if not f.endswith('/')]
  chunks = re.findall(r'Error reading "([^"]+)" in OCDBT database at (?:\w+ file )?"([^"]+)"', text)
  cause = text.rsplit('": ', 1)[-1] if '": ' in text else text
  if files:
    where = files[-1]
  elif chunks:
    where = f'array chunk "{chunks[-1][0]}" of {chunks[-1][1].rstrip("/")}'
  else:
    where = ''
  return (f'{code} in {where}: {cause}' if where else f'{code}: {cause}')[:400]


def _os_error_text(error: BaseException) -> tuple[str, int | None, bool]:
  """(text, errno, whether it is an operating-system error) behind `error`.

  Python raises OSError; tensorstore raises ValueError with the errno in
  `[os_error_code='28']`. Both become e.g. 'No space left on device (ENOSPC)'.
  """
  seen = set()
  chain = error
  while chain is not None and id(chain) not in seen:
    seen.add(id(chain))
    if isinstance(chain, OSError) and chain.errno:
      name = errno.errorcode.get(chain.errno, str(chain.errno))
      return f'{chain.strerror or os.strerror(chain.errno)} ({name})', chain.errno, True
    match = re.search(r"os_error_code='?(\d+)", str(chain))
    if match:
      code = int(match.group(1))
      return f'{os.strerror(code)} ({errno.errorcode.get(code, code)})', code, True
    chain = chain.__cause__ or chain.__context__
  return _short_error(error), None, False


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


@contextlib.contextmanager
def _quiet_read_only_notice(read_only: bool):
  """Orbax warns 'Given directory is read only' for every read-only manager: the mode
  asked for, not a problem, and alarming in a user's console."""
  if not read_only:
    yield
    return

  def drop(record):
    return 'is read only' not in record.getMessage()

  logger = logging.getLogger('absl')
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


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
      fetched with one ``jax.device_get``). Call ``check_saves()`` every step
      so that a failed background save stops the run at once.
    read_only: for readers (``--mode eval``) of a workdir a trainer may be
      writing: create, move and delete nothing (no directories, no signature
      file, no clean-up of the trainer's in-flight temporary directories), and
      never save. The model signature is still checked. A damaged newest step
      is skipped, not moved.

  Every process of a multi-host job must construct the Checkpointer and call
  ``save``/``restore``/``check_saves``/``close`` (see the module docstring).
  """

  def __init__(
    self,
    workdir: str,
    *,
    model_signature: dict,
    max_to_keep: int = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    read_only: bool = False,
  ):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}.')
    if save_interval_steps < 1:
      raise ValueError(f'save_interval_steps must be >= 1, got {save_interval_steps}.')
    # Orbax refuses relative paths (the quickstart's `--workdir workdirs/digits` is one).
    self._workdir = epath.Path(workdir if fileio.is_remote(workdir) else os.path.abspath(workdir))
    self._ckpt_dir = self._workdir / CHECKPOINT_SUBDIR
    self._damaged_dir = self._workdir / DAMAGED_SUBDIR
    self._signature_path = self._workdir / SIGNATURE_FILENAME
    self._signature = _normalize_signature(model_signature)
    self._read_only = read_only
    self._async_save = async_save and not read_only
    # The step whose async save may still be running (errors are attributed to it),
    # and the save failure once seen: every later save/check raises it again.
    self._pending_step: int | None = None
    self._save_error: CheckpointSaveError | None = None
    self._barriers = 0

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
    if not read_only and jax.process_index() == 0:
      self._ckpt_dir.mkdir(parents=True, exist_ok=True)
      if not self._signature_path.exists():
        fileio.atomic_write_text(
          str(self._signature_path), json.dumps(self._signature, indent=2, sort_keys=True) + '\n'
        )

    # 3. The Orbax manager.
    if read_only:
      # Orbax's read-only mode skips saving, deleting, creating the directory and,
      # crucially, cleaning up `*.orbax-checkpoint-tmp*` directories: those belong
      # to a trainer that may be writing them right now.
      options = ocp.CheckpointManagerOptions(
        read_only=True,
        save_interval_steps=0,
        max_to_keep=None,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=False,
        create=False,
      )
    else:
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
    with _quiet_read_only_notice(read_only):
      self._manager = ocp.CheckpointManager(
        self._ckpt_dir,
        item_names=(_STATE_ITEM, _SIGNATURE_ITEM),
        item_handlers={
          _STATE_ITEM: ocp.StandardCheckpointHandler(),
          _SIGNATURE_ITEM: ocp.JsonCheckpointHandler(filename=SIGNATURE_FILENAME),
        },
        options=options,
      )

  @property
  def read_only(self) -> bool:
    return self._read_only

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
    is saved already. Must be called on every process at every step. Always
    False for a read-only Checkpointer."""
    if self._read_only:
      return False
    step = int(step)
    return step not in self._manager.all_steps() and self._manager.should_save(step)

  def save(self, step: int, state) -> bool:
    """Saves `state` at `step` (asynchronously by default); the caller decides
    when (`should_save`). Must be called on every process. A step that already
    has a checkpoint is never overwritten (returns False), so a final save right
    after a periodic one is harmless. Returns True if a save was started.

    Raises:
      CheckpointSaveError: this save, or an earlier async one, failed.
    """
    if self._read_only:
      raise RuntimeError(
        f'This Checkpointer for {self._workdir} is read-only (evaluation) and cannot '
        'save; construct it with read_only=False to train.'
      )
    step = int(step)
    # Orbax waits for the previous async save before starting one; waiting here
    # first attributes an error from it to its own step.
    self._finish_pending_save()
    if step in self._manager.all_steps():
      return False
    self._pending_step = step
    try:
      started = self._manager.save(
        step,
        args=ocp.args.Composite(
          **{
            _STATE_ITEM: ocp.args.StandardSave(_to_savable(state)),
            _SIGNATURE_ITEM: ocp.args.JsonSave(self._signature),
          }
        ),
        force=True,
      )
    except Exception as e:  # the blocking part (or, synchronously, all) of the save
      raise self._save_failed(step, e) from e
    if not (started and self._async_save):
      self._pending_step = None
    return started

  def check_saves(self) -> None:
    """Raises :class:`CheckpointSaveError` if an async save has failed.

    Cheap (no I/O, no waiting while a save is still running): call it every
    step, so that a full disk stops the run at the next step rather than after
    hours of training that can no longer be saved. Call it on every process.
    """
    if self._save_error is not None:
      raise self._save_error
    if self._pending_step is None or self._manager.is_saving_in_progress():
      return
    self._finish_pending_save()  # finished: collects its error, if any

  def _finish_pending_save(self) -> None:
    """Waits for the in-flight save, if any; a failure -> CheckpointSaveError."""
    if self._save_error is not None:
      raise self._save_error
    if self._pending_step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self._pending_step, e) from e
    self._pending_step = None

  def _save_failed(self, step: int, error: BaseException) -> CheckpointSaveError:
    """Records (and returns, to raise) the one-line error for a failed save."""
    self._pending_step = None
    text, code, is_os_error = _os_error_text(error)
    latest = None
    try:
      # Orbax dropped older steps from its in-memory list when the save started
      # (they are deleted only after a successful save): re-read the directory.
      self._manager.reload()
      latest = self._manager.latest_step()
    except Exception:  # noqa: BLE001 - never hide the save error behind this one
      logging.exception('Could not list %s after a failed save.', self._ckpt_dir)
    if code in (errno.ENOSPC, errno.EDQUOT):
      fix = 'free space on that file system (or raise the quota)'
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
      fix = f'make {self._ckpt_dir} writable'
    elif code == errno.EFBIG:
      fix = 'raise the file-size limit (ulimit -f)'
    elif is_os_error:
      fix = 'fix the storage problem (free space, permissions)'
    else:
      fix = 'fix the cause shown in the traceback'
    if latest is None:
      newest, resume = 'there is no complete checkpoint yet', 'to start again'
    else:
      newest = f'the newest complete checkpoint is step {latest} ({self._ckpt_dir / str(latest)})'
      resume = f'to resume from step {latest}'
    self._save_error = CheckpointSaveError(
      f'Saving the checkpoint for step {step} to {self._ckpt_dir / str(step)} failed: {text}; '
      f'step {step} was not kept as a checkpoint and {newest}. To continue, {fix}, then '
      f'rerun the same command {resume}.'
    )
    return self._save_error

  # -- restore --------------------------------------------------------------

  def restore(self, target_state, step: int | None = None):
    """Restores the checkpoint at `step`, or the newest intact one.

    `target_state` supplies the tree structure, shapes and dtypes (arrays or
    `jax.ShapeDtypeStruct`s). Leaves come back with the target's type:
    numpy stays numpy, host-local jax arrays are put on the target's device,
    globally sharded arrays / `ShapeDtypeStruct`s with a sharding are read
    with that sharding, typed PRNG keys are re-wrapped.

    Without `step`, a damaged newest step (truncated, overwritten or missing
    files, unreadable metadata) is skipped for the next older one; once an older
    one restores, each damaged step is logged (one warning line) and, unless
    read-only, moved to ``<workdir>/checkpoints_damaged/`` (never deleted).
    Must be called on every process (they agree on what is damaged).

    Raises:
      FileNotFoundError: no checkpoint at all (or not at `step`).
      CheckpointMismatchError: stored shapes/dtypes/structure differ from the
        target; the message names each parameter path and both shapes.
      CheckpointDamagedError: `step` is damaged, or (without `step`) every
        step is; the message lists each step and what is wrong with it.
    """
    if step is not None:
      step = int(step)
      if step not in self._manager.all_steps():
        raise FileNotFoundError(
          f'No checkpoint for step {step} in {self._ckpt_dir}; available: {self.all_steps()}.'
        )
      restored, reason = self._agreed_read(target_state, step)
      if reason is not None:
        raise CheckpointDamagedError(
          f'Checkpoint {self._ckpt_dir / str(step)} is damaged ({reason}); nothing was moved. '
          f'Restore another step (available: {self.all_steps()}), or call restore() without '
          'a step to fall back to the newest intact one.'
        )
      return restored

    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'No checkpoint found in {self._ckpt_dir}.')
    damaged = []
    for candidate in steps:
      restored, reason = self._agreed_read(target_state, candidate)
      if reason is None:
        self._set_aside(damaged, restored_step=candidate)
        return restored
      damaged.append((candidate, reason))
    tried = '; '.join(f'step {s}: {r}' for s, r in damaged)
    raise CheckpointDamagedError(
      f'Every checkpoint in {self._ckpt_dir} is damaged, so none was restored and nothing '
      f'was moved ({tried}). Restore the directory from a backup, or train in a new '
      '--workdir (with --config.init_from=<weights .npz> to keep exported weights).'
    )

  def _agreed_read(self, target_state, step: int):
    """(restored, None), or (None, reason) if `step` is damaged on any process.

    Every process reads; they then agree (one tiny all-gather), so that no
    process falls back to an older step while another keeps the newer one.
    """
    outcome, restored, error = 0, None, None
    try:
      restored = self._read_step(target_state, step)
    except _Damaged as e:
      outcome, error = 1, e
    except Exception as e:  # noqa: BLE001 - re-raised below, after the agreement
      outcome, error = 2, e
    outcomes = [outcome]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      outcomes = [int(x) for x in multihost_utils.process_allgather(np.int32(outcome))]
    if outcome == 2:
      raise error
    if 2 in outcomes:
      raise RuntimeError(
        f'Process {outcomes.index(2)} failed to read checkpoint step {step} in '
        f'{self._ckpt_dir}; its log has the error.'
      )
    if 1 in outcomes:
      if error is None:
        return None, f'damaged as read by process {outcomes.index(1)}; see its log'
      return None, error.reason
    return restored, None

  def _set_aside(self, damaged: list[tuple[int, str]], *, restored_step: int) -> None:
    """Moves the damaged steps out of Orbax's view (process 0), one warning each."""
    if not damaged:
      return
    if self._read_only:
      for step, reason in damaged:
        logging.warning(
          'Checkpoint step %d in %s is damaged (%s); restored step %d instead and left '
          'step %d in place (read-only).',
          step,
          self._ckpt_dir,
          reason,
          restored_step,
          step,
        )
      return
    failure = None
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
      for step, reason in damaged:
        src = self._ckpt_dir / str(step)
        try:
          self._damaged_dir.mkdir(parents=True, exist_ok=True)
          dest = self._damaged_dir / f'{step}-{stamp}'
          n = 1
          while dest.exists():
            n += 1
            dest = self._damaged_dir / f'{step}-{stamp}-{n}'
          src.rename(dest)
        except OSError as e:
          # Raised after the barrier below, so the other processes do not hang in it.
          failure = CheckpointDamagedError(
            f'Checkpoint step {step} in {self._ckpt_dir} is damaged ({reason}), and moving '
            f'it aside to {self._damaged_dir} failed: {e}. Move {src} out of '
            f'{self._ckpt_dir} by hand (do not delete it), then rerun the same command.'
          )
          break
        logging.warning(
          'Checkpoint step %d in %s is damaged (%s); moved it to %s and restored step %d instead.',
          step,
          self._ckpt_dir,
          reason,
          dest,
          restored_step,
        )
    self._barriers += 1
    ocp.multihost.sync_global_processes(f'nfnet_jax_checkpoint_set_aside_{self._barriers}')
    self._manager.reload()
    if failure is not None:
      raise failure

  def _read_step(self, target_state, step: int):
    """Restores one step; raises _Damaged if its files are damaged."""
    state_dir = self._ckpt_dir / str(step) / _STATE_ITEM
    try:
      metadata = self._manager.item_metadata(step)
      metadata = None if metadata is None else metadata[_STATE_ITEM]
    except Exception as e:
      if not _is_damage(e):
        raise
      if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        raise _Damaged(f'unreadable metadata in {state_dir}: {_short_error(e)}') from e
      if isinstance(e, KeyError):
        raise _Damaged(f'{state_dir} is missing: {_short_error(e)}') from e
      raise _Damaged(_short_error(e)) from e
    if metadata is None:
      raise _Damaged(f'no array metadata in {state_dir} (its _METADATA file is missing)')
    self._check_against_metadata(target_state, step, metadata)

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
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          **{
            _STATE_ITEM: ocp.args.StandardRestore(item),
          }
        ),
      )[_STATE_ITEM]
    except Exception as e:
      if _is_damage(e):
        raise _Damaged(_short_error(e)) from e
      raise

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

  def _check_against_metadata(self, target_state, step: int, metadata) -> None:
    tree = getattr(metadata, 'tree', metadata)

    def is_md_leaf(x):
      return hasattr(x, 'shape') and hasattr(x, 'dtype')

    stored = {}
    for path, md in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_md_leaf)[0]:
      stored[tuple(_key_component(k) for k in path)] = md
    if not stored:
      # Every saved state has arrays: no metadata at all means the metadata file
      # is missing or empty, not that the model differs.
      raise _Damaged(
        f'no array metadata in {self._ckpt_dir / str(step) / _STATE_ITEM} (its _METADATA '
        'file is missing or empty)'
      )

    problems = []  # (top-level key, line)
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(target_state)[0]:
      key = tuple(_key_component(k) for k in path)
      name = jax.tree_util.keystr(path)
      seen.add(key)
      top = key[0] if key else ''
      if key not in stored:
        problems.append((top, f'  {name}: expected by the target but missing from the checkpoint'))
        continue
      md = stored[key]
      shape, dtype = _leaf_shape_dtype(leaf)
      found_shape = tuple(getattr(md, 'shape', None) or ())
      found_dtype = getattr(md, 'dtype', None)
      found_dtype = np.dtype(found_dtype) if found_dtype is not None else None
      if found_shape != shape:
        problems.append(
          (
            top,
            f'  {name}: expected shape {fileio.fmt_shape(shape)}, found '
            f'{fileio.fmt_shape(found_shape)} in the checkpoint',
          )
        )
      elif dtype is not None and found_dtype is not None and found_dtype != dtype:
        problems.append(
          (
            top,
            f'  {name}: expected dtype {dtype}, found '
            f'{found_dtype} in the checkpoint (shape '
            f'{fileio.fmt_shape(shape)})',
          )
        )
    for key in stored:
      if key not in seen:
        problems.append(
          (
            key[0] if key else '',
            f'  {"/".join(key)}: in the checkpoint but not in the target state',
          )
        )
    if not problems:
      return
    lines = [line for _, line in problems]
    more = len(lines) - _MAX_REPORTED_MISMATCHES
    shown = lines[:_MAX_REPORTED_MISMATCHES]
    if more > 0:
      shown.append(f'  ... and {more} more')
    where = self._ckpt_dir / str(step)
    if all(top == _OPT_STATE_KEY for top, _ in problems):
      # The parameters match: only the optimizer's state differs, i.e. the
      # optimizer configuration changed, not the model.
      raise CheckpointMismatchError(
        f'Checkpoint {where} was written with a different optimizer ({len(problems)} '
        f'mismatching entries, all in the optimizer state `{_OPT_STATE_KEY}`):\n'
        + '\n'.join(shown)
        + '\nThe model matches, but the optimizer configuration (e.g. optimizer.name, '
        'momentum on/off, clipping on/off) differs from the run that wrote this '
        'checkpoint. To resume that run, restore its optimizer settings. To train its '
        'weights with the new optimizer, start a new --workdir with '
        f'--config.init_from={self._workdir}/params_ema.npz (the weights a finished run '
        'exports) to fine-tune from them.'
      )
    raise CheckpointMismatchError(
      f'Checkpoint {where} does not match the model '
      f'being restored ({len(problems)} mismatching entries):\n' + '\n'.join(shown) + '\n'
      'The checkpoint was probably written for a different model '
      'configuration; use a fresh --workdir for this model.'
    )

  # -- lifecycle ------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until any in-flight async save is finalized on disk.

    Raises:
      CheckpointSaveError: that save (or an earlier one) failed.
    """
    self._finish_pending_save()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax resources (all hosts).

    Raises :class:`CheckpointSaveError` if the last save failed and no earlier
    call has raised it yet (a ``finally: close()`` does not repeat an error the
    caller is already handling).
    """
    try:
      if self._save_error is None:
        self._finish_pending_save()
    finally:
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001
        if self._save_error is None:
          raise
        # The failure was reported already; Orbax re-raising it here adds nothing.
        logging.debug('Orbax close after a failed save raised', exc_info=True)

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
