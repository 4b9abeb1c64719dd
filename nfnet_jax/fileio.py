"""Small file helpers every writer in the package shares: remote paths, atomic writes.

A workdir or a weights file may be local or remote (`gs://...`, anything with a scheme);
remote paths go through TensorFlow's gfile, which is imported only when one is used.
Every file the package writes for a reader to trust (weights, the model signature, the
class index, a remote metrics log) is written whole or not at all: to a temporary name in
the same directory, then renamed over the destination.
"""

import logging
import os
import tempfile
from typing import BinaryIO, Callable


def is_remote(path) -> bool:
  """True for `gs://bucket/...` and other URLs; False for local paths."""
  return '://' in os.fspath(path)


_TF_GPUS_HIDDEN = False


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow off the accelerators so that JAX gets all their memory.

  Idempotent. Must run before TensorFlow initialises its devices; if it is too late, a
  warning is logged when TensorFlow can already see a GPU.
  """
  global _TF_GPUS_HIDDEN
  if _TF_GPUS_HIDDEN:
    return
  tf = _import_tensorflow()
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow's devices are already initialised.
    if tf.config.get_visible_devices('GPU'):
      logging.warning(
        'TensorFlow was initialised before nfnet_jax could hide the GPUs '
        'from it; it may take accelerator memory that JAX needs.'
      )
  _TF_GPUS_HIDDEN = True


def _import_tensorflow():
  # Imported on first use: it takes seconds, and the models, the weights tools and
  # training on local files never need it for file access.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


def tensorflow():
  """TensorFlow, kept off the accelerators (JAX owns them)."""
  hide_gpus_from_tensorflow()
  return _import_tensorflow()


def gfile():
  """TensorFlow's gfile: local paths, gs:// and the other file systems TF knows."""
  return tensorflow().io.gfile


def fmt_shape(shape) -> str:
  """'(3, 3, 16, 32)', '(10,)', '()': a shape as Python writes a tuple."""
  return str(tuple(int(d) for d in shape))


def atomic_write(path, write: Callable[[BinaryIO], None], *, overwrite: bool = True) -> str:
  """Calls `write(f)` on a temporary file beside `path`, then renames it to `path`.

  Readers see the old file or the whole new one, never a part. Local files are flushed
  to disk before the rename and get the permissions the umask gives new files. With
  `overwrite=False` an existing `path` (even one created meanwhile) raises
  FileExistsError and is left as it was.
  """
  path = os.fspath(path)
  if not overwrite and exists(path):
    raise FileExistsError(f'{path} already exists; pass overwrite=True (--overwrite) to replace it')
  if is_remote(path):
    fs = gfile()
    head, base = path.rsplit('/', 1)
    tmp = f'{head}/.{base}.tmp-{os.getpid()}'
    try:
      with fs.GFile(tmp, 'wb') as f:
        write(f)
      fs.rename(tmp, path, overwrite=overwrite)
    finally:
      if fs.exists(tmp):
        fs.remove(tmp)
    return path
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
    if overwrite:
      os.replace(tmp, path)
    else:
      _link_new(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def atomic_write_text(path, text: str, *, overwrite: bool = True) -> str:
  return atomic_write(path, lambda f: f.write(text.encode('utf-8')), overwrite=overwrite)


def read_text(path) -> str:
  if is_remote(path):
    with gfile().GFile(os.fspath(path), 'r') as f:
      return f.read()
  with open(path, encoding='utf-8') as f:
    return f.read()


def exists(path) -> bool:
  """Whether a local or remote path exists (a dangling local link counts)."""
  path = os.fspath(path)
  return gfile().exists(path) if is_remote(path) else os.path.lexists(path)


def _link_new(tmp: str, path: str) -> None:
  """Renames `tmp` to `path` unless `path` exists, atomically where links exist."""
  try:
    os.link(tmp, path)  # fails if `path` appeared since the check
  except FileExistsError:
    raise FileExistsError(
      f'{path} already exists; pass overwrite=True (--overwrite) to replace it'
    ) from None
  except OSError:  # no hard links on this filesystem
    if os.path.lexists(path):
      raise FileExistsError(f'{path} already exists') from None
    os.replace(tmp, path)
