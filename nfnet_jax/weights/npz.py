"""The package's pickle-free weights format: a plain `.npz` that `np.load(path,
allow_pickle=False)` reads.

One entry per parameter, keyed `module_path + '//' + param_name`; Haiku module paths
contain '/' and '~' but never '//' (module names cannot be empty), and parameter names
contain no '/', so the split is unambiguous. Two metadata entries: `__format__` =
'nfnet_jax.params.v1' marks the file as ours, `__variant__` names the model (the
registry's canonical name, e.g. 'F0', 'NF-RegNet-B0'; older files hold short names such
as 'B0' or 'ResNet50', which the registry still resolves).

Files are written whole or not at all (`fileio.atomic_write`), locally or to `gs://`.
No model imports: checking a tree against a model is `check.py`'s job.
"""

import os
from typing import Mapping, Optional
import zipfile

import numpy as np

from nfnet_jax import fileio
from nfnet_jax.weights.errors import CorruptCheckpointError, PretrainedError

SEPARATOR = '//'
FORMAT_KEY = '__format__'
VARIANT_KEY = '__variant__'
CONVERTED_FORMAT = 'nfnet_jax.params.v1'


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
  """{'NFNet/~/stem_conv0//w': array, ...}: one flat key per parameter."""
  flat = {}
  for module, group in params.items():
    if SEPARATOR in module or module.startswith('__'):
      raise ValueError(
        f'module path {module!r} cannot be stored: it contains {SEPARATOR!r} or starts with "__"'
      )
    for name, value in group.items():
      if '/' in name:
        raise ValueError(f'parameter name {name!r} in {module} contains "/"')
      flat[f'{module}{SEPARATOR}{name}'] = np.asarray(value)
  return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Inverse of `flatten_params` (keys without the separator are metadata: skipped)."""
  params = {}
  for key, value in flat.items():
    if SEPARATOR not in key:
      continue
    module, _, name = key.rpartition(SEPARATOR)
    params.setdefault(module, {})[name] = value
  return params


def save_converted(params: Mapping, dst, variant: str, *, overwrite: bool = False) -> str:
  """Writes `params` as a pickle-free .npz recording `variant`; returns `dst`.

  Atomic (temporary file + rename) for local and remote (`gs://`) paths alike. Refuses
  to replace an existing `dst` (FileExistsError) unless `overwrite`. `variant` is stored
  as given: `convert` and `export_params` pass the registry's canonical name.
  """
  entries = flatten_params(params)
  entries[FORMAT_KEY] = np.array(CONVERTED_FORMAT)
  entries[VARIANT_KEY] = np.array(variant)
  sequential = fileio.is_remote(dst)

  def write(f):  # what np.savez does, on a stream it would not take
    with zipfile.ZipFile(
      _WriteOnly(f) if sequential else f, 'w', zipfile.ZIP_STORED, allowZip64=True
    ) as archive:
      for key, value in entries.items():
        with archive.open(f'{key}.npy', 'w', force_zip64=True) as member:
          np.lib.format.write_array(member, value, allow_pickle=False)

  return fileio.atomic_write(dst, write, overwrite=overwrite)


class _WriteOnly:
  """A remote (gfile) file as a plain stream: such files cannot seek or tell, and
  zipfile, given a stream without either, writes the archive sequentially (each
  member's sizes after its data) instead of seeking back."""

  def __init__(self, f):
    self._f = f

  def write(self, data) -> int:
    self._f.write(data)  # gfile returns None; zipfile counts on the length
    return len(data)

  def flush(self) -> None:
    self._f.flush()


def _open(path: str):
  return fileio.gfile().GFile(path, 'rb') if fileio.is_remote(path) else open(path, 'rb')


def read_head(path, size: int = 4) -> bytes:
  """The first bytes of a local or remote file (to tell a zip from a pickle)."""
  with _open(os.fspath(path)) as f:
    return f.read(size)


def load_converted(path) -> tuple[dict[str, dict[str, np.ndarray]], Optional[str]]:
  """({module path: {param name: array}}, the stored variant or None) of a converted
  file, local or remote, read with `allow_pickle=False`.

  Raises CorruptCheckpointError when the archive is unreadable or not ours.
  """
  path = os.fspath(path)
  # Open it ourselves (a missing file is an OSError, not a corrupt one); np.load would
  # also leak its own handle when the zip is unreadable.
  with _open(path) as f:
    try:
      with np.load(f, allow_pickle=False) as archive:
        files = set(archive.files)
        if FORMAT_KEY not in files or str(archive[FORMAT_KEY]) != CONVERTED_FORMAT:
          raise CorruptCheckpointError(
            f'{path} is a .npz archive but not one written by nfnet_jax.convert (no '
            f'{FORMAT_KEY!r} = {CONVERTED_FORMAT!r} entry)'
          )
        variant = str(archive[VARIANT_KEY]) if VARIANT_KEY in files else None
        flat = {k: archive[k] for k in archive.files if SEPARATOR in k}
    except PretrainedError:
      raise
    except Exception as e:  # zipfile.BadZipFile, a truncated member, an object array...
      raise CorruptCheckpointError(
        f'{path} is not a readable converted .npz ({type(e).__name__}: {e}): it is '
        'truncated or corrupt; convert the released file again'
      ) from e
  return unflatten_params(flat), variant
