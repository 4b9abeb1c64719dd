"""Metric logging for the training loop: JSONL, TensorBoard and a console bar.

``MetricsLogger`` writes every ``write(step, metrics)`` call as

* one JSON object per line appended to ``<workdir>/metrics.jsonl``, with
  ``"step"`` (int) first and then the metrics in the order given, e.g.::

      {"step": 1000, "train/loss": 2.31, "train/top1": 0.42, "img/s": 5120.5}

* the same scalars to TensorBoard under ``<workdir>/tensorboard``
  (view with ``tensorboard --logdir <workdir>/tensorboard``).

``progress(step, **postfix)`` drives a tqdm bar over ``total_steps`` that shows
the elapsed time, the ETA and the given postfix (loss, top-1, img/s, ...).

Conventions:

* **Non-finite values** are written to ``metrics.jsonl`` as the JSON *strings*
  ``"nan"``, ``"inf"`` and ``"-inf"`` (JSON has no NaN/Infinity literals), so
  every line stays parseable by ``json.loads`` and ``float(value)`` turns them
  back into floats. :func:`read_metrics` does that conversion for you.
  TensorBoard receives the real float values.
* Integers (numpy/jax integer scalars included) stay ints, other numeric
  scalars (numpy/jax/0-d or size-1 arrays) become Python floats, bools stay
  bools. Anything else (strings, non-scalar arrays) raises ``TypeError`` /
  ``ValueError``.
* **Resumed runs** append to the existing ``metrics.jsonl``. A trailing
  incomplete line left by a crash is dropped on start-up so the file stays valid
  JSONL. With ``resume_step`` (the step the run restored), records of later steps
  came from work that was never checkpointed and is about to be redone: they move
  to ``metrics_discarded.jsonl`` (kept, for diagnosis), so ``metrics.jsonl`` holds
  each step once and in order.
* Only the main process (default: ``jax.process_index() == 0``) does anything;
  on the other processes every method is a no-op and no file is created.
* ``tensorflow`` (for ``tf.summary`` and remote files) is imported when the
  logger starts and is hidden from GPUs so it cannot take accelerator memory
  from JAX (``fileio.tensorflow``).
* Local workdirs are appended to and flushed on every ``write``. Remote
  workdirs (``gs://...``), which do not support appending, are rewritten
  (tmp file + rename) at most every ``flush_secs`` and on ``close``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from tqdm import tqdm

from nfnet_jax import fileio

__all__ = [
  'MetricsLogger',
  'read_metrics',
  'METRICS_FILENAME',
  'DISCARDED_FILENAME',
  'TENSORBOARD_SUBDIR',
]

METRICS_FILENAME = 'metrics.jsonl'
DISCARDED_FILENAME = 'metrics_discarded.jsonl'
TENSORBOARD_SUBDIR = 'tensorboard'
_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}


def _to_python(key: str, value: Any) -> bool | int | float:
  """Numpy/jax/python scalar -> python bool/int/float (may be non-finite)."""
  if isinstance(value, bool):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return value
  if isinstance(value, (str, bytes)):
    raise TypeError(f'Metric {key!r} must be numeric, got {value!r}.')
  try:
    arr = np.asarray(value)  # also fetches jax arrays from the device
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f'Metric {key!r} has unsupported type {type(value).__name__}.') from e
  if arr.size != 1:
    raise ValueError(f'Metric {key!r} must be a scalar, got an array of shape {arr.shape}.')
  kind = arr.dtype.kind
  item = arr.reshape(()).item()
  if kind == 'b':
    return bool(item)
  if kind in 'iu':
    return int(item)
  if kind == 'f':
    return float(item)
  raise TypeError(f'Metric {key!r} must be numeric, got dtype {arr.dtype}.')


def _to_json(value: bool | int | float) -> bool | int | float | str:
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  return value


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
  """Parses ``metrics.jsonl``; ``"nan"``/``"inf"``/``"-inf"`` become floats."""
  path = workdir_or_file
  if not path.endswith('.jsonl'):
    path = os.path.join(path, METRICS_FILENAME)
  if fileio.is_remote(path):
    text = fileio.read_text(path)
  else:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  records = []
  for line in text.splitlines():
    if not line.strip():
      continue
    record = json.loads(line)
    records.append(
      {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
    )
  return records


class MetricsLogger:
  """Writes scalar metrics to JSONL + TensorBoard and shows a progress bar.

  Args:
    workdir: run directory (local or ``gs://``); files go directly inside it.
    total_steps: length of the run, for the progress bar and its ETA.
    is_main_process: whether this process logs; defaults to
      ``jax.process_index() == 0``. Other processes do nothing.
    tensorboard: also write TensorBoard summaries.
    progress_bar: show a tqdm bar on stderr when ``progress`` is called.
    flush_secs: how often TensorBoard (and a remote ``metrics.jsonl``) are
      flushed; everything is flushed on ``close``.
    resume_step: the step a restarted run restored; records of later steps (work
      lost with the process) move to ``metrics_discarded.jsonl``. 0 means the run
      starts over (its first checkpoint was never completed): every record moves.
  """

  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    is_main_process: bool | None = None,
    tensorboard: bool = True,
    progress_bar: bool = True,
    flush_secs: float = 30.0,
    resume_step: int | None = None,
  ):
    if is_main_process is None:
      is_main_process = jax.process_index() == 0
    self._active = bool(is_main_process)
    self._workdir = str(workdir)
    self._total_steps = int(total_steps)
    self._use_progress_bar = progress_bar
    self._flush_secs = float(flush_secs)
    self._closed = False
    self._bar = None
    self._tf = None
    self._tb_writer = None
    self._file = None
    self._remote_lines: list[str] | None = None
    self._remote_dirty = False
    self._last_flush = time.monotonic()
    self.metrics_path = os.path.join(self._workdir, METRICS_FILENAME)
    self.tensorboard_dir = os.path.join(self._workdir, TENSORBOARD_SUBDIR)
    if not self._active:
      return

    if fileio.is_remote(self._workdir):
      self._tf = fileio.tensorflow()
      gfile = self._tf.io.gfile
      gfile.makedirs(self._workdir)
      self._remote_lines = []
      if gfile.exists(self.metrics_path):
        text = gfile.GFile(self.metrics_path, 'r').read()
        self._remote_lines = [line for line in text.split('\n')[:-1] if line.strip()]
      if resume_step is not None:
        self._remote_lines = self._discard_after(self._remote_lines, resume_step)
    else:
      os.makedirs(self._workdir, exist_ok=True)
      self._drop_incomplete_last_line(self.metrics_path)
      if resume_step is not None and os.path.exists(self.metrics_path):
        with open(self.metrics_path, encoding='utf-8') as f:
          lines = f.read().splitlines()
        kept = self._discard_after(lines, resume_step)
        if len(kept) != len(lines):
          fileio.atomic_write_text(self.metrics_path, ''.join(line + '\n' for line in kept))
      self._file = open(self.metrics_path, 'a', encoding='utf-8')

    if tensorboard:
      if self._tf is None:
        self._tf = fileio.tensorflow()
      self._tb_writer = self._tf.summary.create_file_writer(
        self.tensorboard_dir, flush_millis=int(self._flush_secs * 1000)
      )

  def _discard_after(self, lines: list[str], resume_step: int) -> list[str]:
    """`lines` without the records of steps after `resume_step`, which are appended
    to the discarded file (written before `metrics.jsonl` is rewritten: a crash in
    between duplicates them there, never loses them)."""
    kept, dropped = [], []
    for line in lines:
      if not line.strip():
        continue
      try:
        step = int(json.loads(line)['step'])
      except (ValueError, KeyError, TypeError):
        kept.append(line)  # not ours to judge
        continue
      (dropped if step > resume_step or resume_step == 0 else kept).append(line)
    if dropped:
      path = os.path.join(self._workdir, DISCARDED_FILENAME)
      old = fileio.read_text(path) if fileio.exists(path) else ''
      fileio.atomic_write_text(path, old + ''.join(line + '\n' for line in dropped))
      self._remote_dirty = self._remote_lines is not None
      print(
        f'MetricsLogger: the run resumed from step {resume_step}; {len(dropped)} records of '
        f'later steps (work that was not checkpointed) moved to {path}.',
        file=sys.stderr,
      )
    return kept

  @staticmethod
  def _drop_incomplete_last_line(path: str) -> None:
    """Removes a partial trailing line (crash mid-write); keeps the rest."""
    if not os.path.exists(path):
      return
    with open(path, 'rb+') as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      if size == 0:
        return
      f.seek(size - 1)
      if f.read(1) == b'\n':
        return
      # Find the last newline; everything after it is an incomplete record.
      chunk = min(size, 1 << 16)
      pos = size
      keep = 0
      while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        data = f.read(pos - start)
        idx = data.rfind(b'\n')
        if idx >= 0:
          keep = start + idx + 1
          break
        pos = start
      f.truncate(keep)
    print(
      f'MetricsLogger: dropped an incomplete last line of {path} ({size - keep} bytes).',
      file=sys.stderr,
    )

  @property
  def is_main_process(self) -> bool:
    return self._active

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs scalar `metrics` at `step` (JSONL line + TensorBoard scalars)."""
    if not self._active:
      return
    if self._closed:
      raise RuntimeError('MetricsLogger.write() called after close().')
    step = int(step)
    values = collections.OrderedDict()
    for key, value in metrics.items():
      key = str(key)
      if key == 'step':
        continue  # `step` is always the argument, written first.
      values[key] = _to_python(key, value)

    record = {'step': step}
    record.update((k, _to_json(v)) for k, v in values.items())
    line = json.dumps(record, allow_nan=False)
    if self._file is not None:
      self._file.write(line + '\n')
      self._file.flush()
    else:
      self._remote_lines.append(line)
      self._remote_dirty = True

    if self._tb_writer is not None:
      tf = self._tf
      with self._tb_writer.as_default(step=step):
        for key, value in values.items():
          tf.summary.scalar(key, float(value))

    if time.monotonic() - self._last_flush >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    """Pushes everything written so far to disk."""
    if not self._active or self._closed:
      return
    self._last_flush = time.monotonic()
    if self._file is not None:
      self._file.flush()
    if self._remote_lines is not None and self._remote_dirty:
      fileio.atomic_write_text(
        self.metrics_path, ''.join(line + '\n' for line in self._remote_lines)
      )
      self._remote_dirty = False
    if self._tb_writer is not None:
      self._tb_writer.flush()

  def progress(self, step: int, **postfix: Any) -> None:
    """Moves the console bar to `step` of `total_steps`, showing `postfix`.

    Keys that are not identifiers can be passed by unpacking a dict, e.g.
    ``logger.progress(step, loss=l, top1=a, **{'img/s': ips})``. Resumed runs
    start the bar at the resumed step, so the rate and ETA are not skewed.
    """
    if not self._active or not self._use_progress_bar or self._closed:
      return
    step = int(step)
    if self._bar is None:
      interactive = getattr(sys.stderr, 'isatty', lambda: False)()
      self._bar = tqdm(
        total=self._total_steps,
        initial=step,
        unit='step',
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
        # In log files (no tty) refresh rarely instead of flooding them.
        mininterval=0.5 if interactive else 30.0,
      )
    if postfix:
      self._bar.set_postfix(
        collections.OrderedDict((k, self._format(v)) for k, v in postfix.items()), refresh=False
      )
    delta = step - self._bar.n
    if delta > 0:
      self._bar.update(delta)
    elif delta < 0:
      self._bar.n = step
      self._bar.refresh()

  @staticmethod
  def _format(value: Any) -> str:
    try:
      v = _to_python('', value)
    except (TypeError, ValueError):
      return str(value)
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)

  def close(self) -> None:
    """Flushes and closes everything; further writes raise. Idempotent."""
    if not self._active or self._closed:
      return
    self.flush()
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    if self._file is not None:
      self._file.close()
    if self._tb_writer is not None:
      self._tb_writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
