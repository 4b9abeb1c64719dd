"""One trainer per workdir: a lock the trainer holds while it runs.

Two trainers writing the same workdir would interleave checkpoints, metrics and
exported weights, and each would delete the other's in-flight saves. The
trainer therefore takes ``<workdir>/trainer.lock`` once its config is
validated and before it writes anything, and a second trainer is refused with
one line naming the holder (host, pid, start time, command line) and the fix::

    with workdir.lock(path, command=shlex.join(sys.orig_argv)):
      train(...)

Readers (``--mode eval``, ``nfnet-classify``, TensorBoard) take no lock and are
never refused: reading while training is allowed. :func:`read_holder` says who
holds the lock, without taking it. In a multi-host job only process 0 takes
the lock (the other processes write nothing of their own into the workdir).

Two implementations, chosen by the path (``backend='auto'``):

* **Local paths** (and NFS): ``fcntl.flock`` on the lock file. The kernel drops
  the lock when the holder exits in any way, ``kill -9`` included, so a crashed
  trainer never leaves the workdir stuck. The holder's details are written into
  the file for the refusal message; the file is removed on a clean release.
  Limits: a child process forked by the trainer inherits the open lock file and
  keeps the lock until it exits too; flock on NFS needs a server with lock
  support (NFSv4 or lockd).
* **Remote paths** (``gs://...``), where nothing like flock exists: the lock
  file holds the holder's details and a *heartbeat* timestamp that a daemon
  thread rewrites every ``heartbeat_s`` seconds. A lock whose heartbeat is more
  than ``missed_heartbeats`` intervals old is stale (its holder died) and is
  taken over. Limits: this needs the hosts' clocks to agree to well within
  ``heartbeat_s * missed_heartbeats`` (NTP does); after a crash the workdir stays
  locked for up to that long; the take-over is not atomic, so two trainers
  started within the same second could both win (each re-reads the file after
  writing it, which catches all but truly simultaneous starts); and a holder
  frozen for longer than the stale period (e.g. a suspended VM) loses the lock,
  which its heartbeat thread notices: ``WorkdirLock.check()`` then raises.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid

from nfnet_jax import fileio

__all__ = [
  'LOCK_FILENAME',
  'Holder',
  'WorkdirLock',
  'WorkdirLockedError',
  'lock',
  'read_holder',
]

LOCK_FILENAME = 'trainer.lock'
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_MISSED_HEARTBEATS = 4

# flock attempts before refusing: a reader of `read_holder` holds the lock for
# microseconds to test it, which must not turn a free workdir into a refusal.
_FLOCK_ATTEMPTS = 20
_FLOCK_RETRY_S = 0.025


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir (or took it over from this one)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir's lock, as written into the lock file."""

  host: str
  pid: int
  start_time: float  # seconds since the epoch
  command: str
  token: str = ''  # unique per acquisition: tells a take-over from our own file
  heartbeat: float | None = None  # remote lock: last refresh (seconds since the epoch)
  heartbeat_s: float | None = None  # remote lock: refresh interval

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True) + '\n'

  @classmethod
  def from_json(cls, text: str) -> Holder | None:
    """The holder in a lock file's text; None if it is empty or not a lock record."""
    try:
      record = json.loads(text)
      names = {f.name for f in dataclasses.fields(cls)}
      return cls(**{k: v for k, v in record.items() if k in names})
    except (ValueError, TypeError):
      return None

  def describe(self) -> str:
    if not self.pid:  # a placeholder: the file did not hold a record
      return f'an unidentified process {self.command}'
    started = datetime.datetime.fromtimestamp(self.start_time, datetime.timezone.utc)
    return (
      f'pid {self.pid} on host {self.host}, started {started:%Y-%m-%d %H:%M:%S} UTC, '
      f'command: {self.command}'
    )


_UNKNOWN_HOLDER = Holder('?', 0, 0.0, '(its details are not written yet)')


def _lock_path(workdir: str) -> str:
  workdir = os.fspath(workdir)
  if fileio.is_remote(workdir):
    return workdir.rstrip('/') + '/' + LOCK_FILENAME
  return os.path.join(os.path.abspath(workdir), LOCK_FILENAME)


def _default_command() -> str:
  return shlex.join(getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv])


def _new_holder(command: str | None, heartbeat_s: float | None = None) -> Holder:
  now = time.time()
  return Holder(
    host=socket.gethostname(),
    pid=os.getpid(),
    start_time=now,
    command=command if command is not None else _default_command(),
    token=uuid.uuid4().hex,
    heartbeat=now if heartbeat_s is not None else None,
    heartbeat_s=heartbeat_s,
  )


def _refusal(workdir: str, path: str, holder: Holder | None, extra: str = '') -> str:
  who = holder.describe() if holder else 'a process that has not yet written its details'
  return (
    f'Workdir {workdir} is in use by another trainer ({who}){extra}. Only one trainer may '
    f'write a workdir: wait for that run to finish or stop it, or train in another --workdir '
    f'(evaluating with --mode eval is allowed while it trains). Lock file: {path}.'
  )


def _backend_for(workdir: str, backend: str) -> str:
  if backend == 'auto':
    return 'heartbeat' if fileio.is_remote(os.fspath(workdir)) else 'flock'
  if backend not in ('flock', 'heartbeat'):
    raise ValueError(f"backend must be 'auto', 'flock' or 'heartbeat', got {backend!r}.")
  if backend == 'flock' and fileio.is_remote(os.fspath(workdir)):
    raise ValueError(f'flock cannot lock the remote path {workdir}; use the heartbeat backend.')
  return backend


# ---------------------------------------------------------------------------
# Local: flock.
# ---------------------------------------------------------------------------


def _read_fd(fd: int) -> str:
  return os.pread(fd, 1 << 16, 0).decode('utf-8', errors='replace')


def _flock_holder(path: str) -> Holder | None:
  """The live holder of a flock lock file; None if the lock is free."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
  except FileNotFoundError:
    return None
  try:
    try:
      # Free if we can take it ourselves (released at once); a separate open file
      # description, so this also sees a lock held by this very process.
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return Holder.from_json(_read_fd(fd)) or _UNKNOWN_HOLDER
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


def _flock_acquire(workdir: str, path: str, holder: Holder) -> int:
  """The locked file descriptor, with `holder` written into the file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    for attempt in range(_FLOCK_ATTEMPTS):
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if attempt == _FLOCK_ATTEMPTS - 1:
          # Details may be mid-write by a holder that has just started: read twice.
          found = Holder.from_json(_read_fd(fd))
          if found is None:
            time.sleep(_FLOCK_RETRY_S)
            found = Holder.from_json(_read_fd(fd))
          os.close(fd)
          raise WorkdirLockedError(_refusal(workdir, path, found)) from None
        time.sleep(_FLOCK_RETRY_S)
    # The previous holder may have removed the file between our open and our
    # flock (a clean release unlinks it): then we locked an orphaned inode that
    # the next trainer would not see. Lock the file that is at `path` now.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.pwrite(fd, holder.to_json().encode('utf-8'), 0)
  os.fsync(fd)
  return fd


def _flock_release(path: str, fd: int) -> None:
  # Unlink while still holding the lock (see _flock_acquire for why that is safe),
  # so a finished run leaves no lock file behind.
  try:
    if os.stat(path).st_ino == os.fstat(fd).st_ino:
      os.unlink(path)
  except FileNotFoundError:
    pass
  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)


# ---------------------------------------------------------------------------
# Remote: a heartbeat file.
# ---------------------------------------------------------------------------


def _read_lock_file(path: str) -> str | None:
  try:
    return fileio.read_text(path)
  except FileNotFoundError:
    return None
  except OSError as e:
    if e.errno == errno.ENOENT:
      return None
    raise
  except Exception as e:  # tf.errors.NotFoundError for gs:// paths
    if type(e).__name__ == 'NotFoundError':
      return None
    raise


def _remove_lock_file(path: str) -> None:
  if fileio.is_remote(path):
    fileio.gfile().remove(path)
  else:
    os.remove(path)


def _is_stale(holder: Holder, missed_heartbeats: int, now: float) -> bool:
  if holder.heartbeat is None or not holder.heartbeat_s:
    return True  # not a heartbeat record (e.g. a flock file copied to a bucket)
  return now - holder.heartbeat > holder.heartbeat_s * missed_heartbeats


def _heartbeat_holder(path: str, missed_heartbeats: int) -> Holder | None:
  text = _read_lock_file(path)
  if text is None:
    return None
  holder = Holder.from_json(text)
  if holder is None or _is_stale(holder, missed_heartbeats, time.time()):
    return None
  return holder


# ---------------------------------------------------------------------------
# The public API.
# ---------------------------------------------------------------------------


class WorkdirLock:
  """The held lock of one workdir; a context manager (see :func:`lock`)."""

  def __init__(
    self,
    workdir: str,
    *,
    command: str | None = None,
    backend: str = 'auto',
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    missed_heartbeats: int = DEFAULT_MISSED_HEARTBEATS,
  ):
    if heartbeat_s <= 0 or missed_heartbeats < 2:
      raise ValueError(
        f'heartbeat_s must be > 0 and missed_heartbeats >= 2, got {heartbeat_s} and '
        f'{missed_heartbeats}.'
      )
    self.workdir = os.fspath(workdir)
    self.path = _lock_path(self.workdir)
    self.backend = _backend_for(self.workdir, backend)
    self._command = command
    self._heartbeat_s = heartbeat_s
    self._missed = missed_heartbeats
    self._fd: int | None = None
    self._holder: Holder | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lost: Holder | None = None

  @property
  def holder(self) -> Holder | None:
    """This process's record while it holds the lock."""
    return self._holder

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises :class:`WorkdirLockedError` naming the holder."""
    if self._holder is not None:
      raise RuntimeError(f'{self.path} is already held by this WorkdirLock.')
    if self.backend == 'flock':
      holder = _new_holder(self._command)
      self._fd = _flock_acquire(self.workdir, self.path, holder)
    else:
      holder = self._heartbeat_acquire()
      self._stop.clear()
      self._thread = threading.Thread(
        target=self._heartbeat_loop, name=f'workdir-lock-heartbeat:{self.path}', daemon=True
      )
      self._thread.start()
    self._holder = holder
    return self

  def _heartbeat_acquire(self) -> Holder:
    text = _read_lock_file(self.path)
    if text is not None:
      found = Holder.from_json(text)
      if found is not None and not _is_stale(found, self._missed, time.time()):
        age = time.time() - (found.heartbeat or 0.0)
        raise WorkdirLockedError(
          _refusal(self.workdir, self.path, found, f', last heartbeat {age:.0f} s ago')
        )
      logging.warning(
        'Taking over the stale lock %s (%s): its holder stopped refreshing it.',
        self.path,
        found.describe() if found else 'unreadable record',
      )
    holder = _new_holder(self._command, self._heartbeat_s)
    fileio.atomic_write_text(self.path, holder.to_json())
    # Another trainer starting at the same moment may have written after us; the
    # last writer wins, and the loser sees it here (see the module docstring).
    time.sleep(min(1.0, self._heartbeat_s / 2))
    now_there = Holder.from_json(_read_lock_file(self.path) or '')
    if now_there is None or now_there.token != holder.token:
      raise WorkdirLockedError(_refusal(self.workdir, self.path, now_there))
    return holder

  def _heartbeat_loop(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        found = Holder.from_json(_read_lock_file(self.path) or '')
        if found is None or found.token != self._holder.token:
          # Someone judged us dead and took over (or removed the file): stop
          # refreshing and let check() report it.
          self._lost = found or Holder('?', 0, 0.0, '(the lock file was removed)')
          logging.error('Lost the workdir lock %s to %s.', self.path, self._lost.describe())
          return
        self._holder = dataclasses.replace(self._holder, heartbeat=time.time())
        fileio.atomic_write_text(self.path, self._holder.to_json())
      except Exception:  # noqa: BLE001 - a transient storage error: retry next beat
        logging.warning('Could not refresh the workdir lock %s.', self.path, exc_info=True)

  def check(self) -> None:
    """Raises :class:`WorkdirLockedError` if another trainer has taken the lock
    over (remote lock only, after this process missed its heartbeats)."""
    if self._lost is not None:
      raise WorkdirLockedError(
        f'This trainer lost the lock on {self.workdir} to another trainer '
        f'({self._lost.describe()}) after missing its heartbeats; stop one of them. '
        f'Lock file: {self.path}.'
      )

  def release(self) -> None:
    """Releases the lock (idempotent); the lock file is removed if it is ours."""
    if self._holder is None:
      return
    try:
      if self.backend == 'flock':
        _flock_release(self.path, self._fd)
        self._fd = None
      else:
        self._stop.set()
        if self._thread is not None:
          self._thread.join()
          self._thread = None
        found = Holder.from_json(_read_lock_file(self.path) or '')
        if found is not None and found.token == self._holder.token:
          _remove_lock_file(self.path)
    finally:
      self._holder = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


def lock(
  workdir: str,
  *,
  command: str | None = None,
  backend: str = 'auto',
  heartbeat_s: float = DEFAULT_HEARTBEAT_S,
  missed_heartbeats: int = DEFAULT_MISSED_HEARTBEATS,
) -> WorkdirLock:
  """The trainer's lock on `workdir`, to use as ``with lock(workdir): ...``.

  Args:
    workdir: the run directory (local, or ``gs://...``); created if missing.
    command: the command line shown to a refused second trainer (default: this
      process's command line).
    backend: 'auto' (flock for local paths, heartbeat for remote ones), 'flock'
      or 'heartbeat'.
    heartbeat_s: heartbeat backend: seconds between refreshes of the lock file.
    missed_heartbeats: heartbeat backend: the lock is stale (its holder is taken
      for dead) once its heartbeat is this many intervals old.

  Entering raises :class:`WorkdirLockedError` (one line: holder's host, pid,
  start time and command line, and the fix) if another trainer holds it.
  """
  return WorkdirLock(
    workdir,
    command=command,
    backend=backend,
    heartbeat_s=heartbeat_s,
    missed_heartbeats=missed_heartbeats,
  )


def read_holder(
  workdir: str,
  *,
  backend: str = 'auto',
  missed_heartbeats: int = DEFAULT_MISSED_HEARTBEATS,
) -> Holder | None:
  """Who holds `workdir`'s lock now, or None. Creates nothing; never blocks a trainer."""
  path = _lock_path(workdir)
  if _backend_for(workdir, backend) == 'flock':
    return _flock_holder(path)
  return _heartbeat_holder(path, missed_heartbeats)
