"""The package's pickle-free weights format: a plain `.npz` that `np.load(path,
allow_pickle=False)` reads.

One entry per parameter, keyed `module_path + '//' + param_name`; Haiku module paths
contain '/' and '~' but never '//' (module names cannot be empty), and parameter names
contain no '/', so the split is unambiguous. Two metadata entries: `__format__` =
'nfnet_jax.params.v1' marks the file as ours, `__variant__` names the model (the
registry's canonical name, e.g. 'F0', 'NF-RegNet-B0'; older files hold short names such
as 'B0' or 'ResNet50', which the registry still resolves).

A batch-normalised model's file (`EfficientNet-B0`, `BN-ResNet50`: a run's
`params_ema.npz`) also holds its Haiku state, the batch-norm moving mean and variance
that evaluation normalises with, one entry per array keyed `'__state__/' + module_path +
'//' + name` (`STATE_PREFIX`; no module path starts with '__', so no parameter is
mistaken for one). Readers that know nothing of state skip those entries: the
parameters read the same. Files of the NF families hold none.

Reading checks before it spends memory. `ConvertedFile` reads the zip's central
directory and each entry's .npy header (the first bytes of its member: a compressed
member is inflated no further) and refuses, before any array data is inflated, an entry
that is not a plain numeric array, whose shape's byte count overflows, or whose declared
byte count is not its member's uncompressed size. `shapes()` describes every parameter
at no cost, so `check.py` compares them with the model's before `read_params()` inflates
anything: a small file cannot make the loader allocate what its headers merely claim.

Files are written whole or not at all (`fileio.atomic_write`), locally or to `gs://`.
No model imports: checking a tree against a model is `check.py`'s job.
"""

import io
import os
from typing import Mapping, NamedTuple, Optional
import zipfile

import numpy as np

from nfnet_jax import fileio
from nfnet_jax.weights.errors import CorruptCheckpointError, PretrainedError

SEPARATOR = '//'
FORMAT_KEY = '__format__'
VARIANT_KEY = '__variant__'
CONVERTED_FORMAT = 'nfnet_jax.params.v1'
STATE_PREFIX = '__state__/'
NPY_SUFFIX = '.npy'

# numpy's own bound on a header's text (np.lib.format.read_array_header_*'s default);
# checked before the text is read, since a 2.0 header's length field may claim 4 GiB.
MAX_HEADER_TEXT = 10_000
# A metadata entry is a short string; capping its member lets it be read before the
# parameters are checked against anything.
MAX_METADATA_BYTES = 4096
_MAX_BYTES = int(np.iinfo(np.intp).max)  # no array spans more
_NUMERIC_KINDS = 'biufc'  # bool, ints, unsigned ints, floats, complex
_CHUNK = 1 << 20  # array data is inflated this much at a time


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


def is_state_key(key: str) -> bool:
  """Whether a flat key is a model-state entry (batch norm's statistics)."""
  return key.startswith(STATE_PREFIX)


def save_converted(
  params: Mapping, dst, variant: str, *, overwrite: bool = False, state: Optional[Mapping] = None
) -> str:
  """Writes `params` (and a stateful model's Haiku `state`, if any) as a pickle-free .npz
  recording `variant`; returns `dst`.

  Atomic (temporary file + rename) for local and remote (`gs://`) paths alike. Refuses
  to replace an existing `dst` (FileExistsError) unless `overwrite`. `variant` is stored
  as given: `convert` and `export_params` pass the registry's canonical name.
  """
  entries = flatten_params(params)
  entries.update({STATE_PREFIX + k: v for k, v in flatten_params(state or {}).items()})
  entries[FORMAT_KEY] = np.array(CONVERTED_FORMAT)
  entries[VARIANT_KEY] = np.array(variant)
  sequential = fileio.is_remote(dst)

  def write(f):  # what np.savez does, on a stream it would not take
    with zipfile.ZipFile(
      _WriteOnly(f) if sequential else f, 'w', zipfile.ZIP_STORED, allowZip64=True
    ) as archive:
      for key, value in entries.items():
        with archive.open(f'{key}{NPY_SUFFIX}', 'w', force_zip64=True) as member:
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


# ---------------------------------------------------------------------------
# Reading: headers first, data once they are checked.


class NpyHeader(NamedTuple):
  """What an .npy header declares, and how many bytes it takes before the data."""

  shape: tuple[int, ...]
  dtype: np.dtype
  fortran_order: bool
  header_bytes: int

  @property
  def size(self) -> int:
    """The element count (as `ndarray.size`)."""
    size = 1
    for d in self.shape:  # Python ints: an overflowing product stays exact
      size *= d
    return size

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  @property
  def extent(self) -> int:
    """What NumPy checks against the address space: the bytes the sides span, an empty
    side counting as 1 (so an empty array of huge sides is refused too)."""
    extent = self.dtype.itemsize
    for d in self.shape:
      extent *= max(d, 1)
    return extent


def _short_shape(shape) -> str:
  text = str(tuple(shape))
  return text if len(text) <= 120 else text[:120] + '...)'


class _HeaderError(ValueError):
  """A header this module refuses (numpy's own parser raises plain ValueErrors)."""


def _read_exactly(f, n: int, what: str) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise _HeaderError(f'ends inside its .npy {what}')
  return data


def read_npy_header(f) -> NpyHeader:
  """Reads an .npy header from the stream `f` (left at the start of the data) and checks
  it as `np.load(allow_pickle=False)` would and more: no object dtype, a shape of
  non-negative ints whose byte count fits an array.

  Reads at most `MAX_HEADER_TEXT` + 12 bytes, whatever the length field claims. Raises
  ValueError describing the problem (callers name the file and the entry).
  """
  major, minor = np.lib.format.read_magic(f)  # ValueError when not an .npy
  # Versions 1.0 and 2.0 differ in the width of the length field; 3.0 (a UTF-8 header)
  # is only written for structured dtypes with non-Latin-1 field names.
  width = {(1, 0): 2, (2, 0): 4}.get((major, minor))
  if width is None:
    raise _HeaderError(
      f'is an .npy of format version {major}.{minor}, which a plain numeric array never '
      'needs (1.0 or 2.0 expected)'
    )
  length_field = _read_exactly(f, width, 'header length')
  length = int.from_bytes(length_field, 'little')
  if length > MAX_HEADER_TEXT:
    raise _HeaderError(f'has a {length:,}-byte .npy header (at most {MAX_HEADER_TEXT:,} expected)')
  text = _read_exactly(f, length, 'header')
  # numpy's own parser (ast.literal_eval, no pickle) on the bytes read above.
  reader = (
    np.lib.format.read_array_header_1_0 if width == 2 else np.lib.format.read_array_header_2_0
  )
  shape, fortran_order, dtype = reader(
    io.BytesIO(length_field + text), max_header_size=MAX_HEADER_TEXT
  )
  if dtype.hasobject:
    raise _HeaderError(f'declares dtype {dtype}, which holds Python objects (a pickle)')
  if any(type(d) is not int or d < 0 for d in shape):  # pylint: disable=unidiomatic-typecheck
    raise _HeaderError(f'declares shape {_short_shape(shape)}, which is not a tuple of sizes')
  header = NpyHeader(tuple(shape), dtype, bool(fortran_order), 6 + 2 + width + length)
  if header.extent > _MAX_BYTES:  # else NumPy would refuse it with its own error
    raise _HeaderError(
      f'declares shape {_short_shape(shape)} of {dtype}: {header.extent:.3e} bytes, more '
      f'than any array can hold ({_MAX_BYTES:,})'
    )
  return header


def _placeholder(header: NpyHeader) -> np.ndarray:
  """A zero-stride, read-only array of the declared shape and dtype: costs one element,
  answers `np.shape`/`np.ndim`/`.dtype` like the array the entry will hold."""
  return np.broadcast_to(np.zeros((), header.dtype), header.shape)


class ConvertedFile:
  """A converted .npz opened for reading: its central directory and every entry's .npy
  header are read and checked on opening; no array data is inflated until
  `read_params()`.

  Use as a context manager. Raises CorruptCheckpointError naming the file (and the
  entry) when the archive is unreadable, not ours, or an entry's header is refused;
  OSError when the file cannot be opened.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    # Open it ourselves: a missing file is an OSError, not a corrupt one.
    self._f = _open(self.path)
    self._zip = None
    try:
      try:
        self._zip = zipfile.ZipFile(self._f)
        self._headers = self._read_headers()
        self.variant = self._read_metadata()
      except PretrainedError:
        raise
      except Exception as e:  # zipfile.BadZipFile, an unreadable central directory...
        raise self._corrupt(f'is not a readable converted .npz ({type(e).__name__}: {e})') from e
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> 'ConvertedFile':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._zip is not None:  # it does not close the file it was given
      self._zip.close()
    self._f.close()

  def _corrupt(self, what: str, entry: Optional[str] = None) -> CorruptCheckpointError:
    where = f'{self.path}' if entry is None else f'{self.path}: entry {entry!r}'
    return CorruptCheckpointError(
      f'{where} {what}: it is truncated or corrupt; convert the released file again'
    )

  def _read_headers(self) -> dict[str, tuple[zipfile.ZipInfo, NpyHeader]]:
    """{key: (member, header)} of the parameter and metadata entries; other members are
    never opened (nothing reads them)."""
    headers = {}
    for info in self._zip.infolist():
      if not info.filename.endswith(NPY_SUFFIX):
        raise CorruptCheckpointError(
          f'{self.path} holds the member {info.filename!r}, which is not an .npy array: '
          'it was not written by nfnet_jax.convert; convert the released file again'
        )
      key = info.filename[: -len(NPY_SUFFIX)]
      if SEPARATOR not in key and key not in (FORMAT_KEY, VARIANT_KEY):
        continue
      if key in headers:  # zipfile would read the last one; a writer never makes two
        raise self._corrupt('is stored twice', key)
      with self._zip.open(info) as member:
        try:
          header = read_npy_header(member)
        except _HeaderError as e:
          raise self._corrupt(str(e), key) from e
        except ValueError as e:  # numpy's parser
          raise self._corrupt(
            f'has an unreadable .npy header ({type(e).__name__}: {e})', key
          ) from e
        except Exception as e:  # zipfile.BadZipFile (a CRC: a small member is read whole)...
          raise self._corrupt(f'cannot be read ({type(e).__name__}: {e})', key) from e
      declared = header.header_bytes + header.nbytes
      if declared != info.file_size:
        raise self._corrupt(
          f'declares shape {_short_shape(header.shape)} of {header.dtype} '
          f'({declared:,} bytes with its header), but its zip member holds '
          f'{info.file_size:,} bytes',
          key,
        )
      if SEPARATOR in key and header.dtype.kind not in _NUMERIC_KINDS:
        raise self._corrupt(
          f'declares dtype {header.dtype}, not a plain numeric one (parameters are float arrays)',
          key,
        )
      if SEPARATOR not in key and (
        header.dtype.kind != 'U' or header.shape != () or info.file_size > MAX_METADATA_BYTES
      ):
        raise self._corrupt(
          f'should be a short string, but declares shape {_short_shape(header.shape)} of '
          f'{header.dtype} ({info.file_size:,} bytes)',
          key,
        )
      headers[key] = (info, header)
    return headers

  def _read_metadata(self) -> Optional[str]:
    if FORMAT_KEY not in self._headers or str(self._read(FORMAT_KEY)) != CONVERTED_FORMAT:
      raise CorruptCheckpointError(
        f'{self.path} is a .npz archive but not one written by nfnet_jax.convert (no '
        f'{FORMAT_KEY!r} = {CONVERTED_FORMAT!r} entry)'
      )
    return str(self._read(VARIANT_KEY)) if VARIANT_KEY in self._headers else None

  def shapes(self) -> dict[str, dict[str, np.ndarray]]:
    """{module path: {param name: placeholder}}: zero-stride read-only arrays of each
    entry's declared shape and dtype (nothing of the file's data), for checking the
    parameters against a model before `read_params()`."""
    return unflatten_params(
      {k: _placeholder(h) for k, (_, h) in self._headers.items() if not is_state_key(k)}
    )

  def read_params(self) -> dict[str, dict[str, np.ndarray]]:
    """{module path: {param name: array}}, each as stored (dtype, byte order, Fortran or
    C order), exactly the shapes `shapes()` described."""
    return unflatten_params(
      {k: self._read(k) for k in self._headers if SEPARATOR in k and not is_state_key(k)}
    )

  def state_shapes(self) -> dict[str, dict[str, np.ndarray]]:
    """`shapes()` of the model-state entries ({} in a file without state)."""
    n = len(STATE_PREFIX)
    return unflatten_params(
      {k[n:]: _placeholder(h) for k, (_, h) in self._headers.items() if is_state_key(k)}
    )

  def read_state(self) -> dict[str, dict[str, np.ndarray]]:
    """{module path: {name: array}} of the model-state entries ({} without state)."""
    n = len(STATE_PREFIX)
    return unflatten_params({k[n:]: self._read(k) for k in self._headers if is_state_key(k)})

  def _read(self, key: str) -> np.ndarray:
    """One entry's array: its header read again (it must be the one checked), then
    exactly the declared bytes, a chunk at a time, into an array allocated once."""
    info, header = self._headers[key]
    try:
      with self._zip.open(info) as member:
        if read_npy_header(member) != header:
          raise self._corrupt('changed while it was being read', key)
        flat = np.empty(header.size, header.dtype)
        view = memoryview(flat.view(np.uint8))
        done = 0
        while done < header.nbytes:
          data = member.read(min(_CHUNK, header.nbytes - done))
          if not data:
            raise self._corrupt(f'ends after {done:,} of its {header.nbytes:,} data bytes', key)
          view[done : done + len(data)] = data
          done += len(data)
        member.read(1)  # reaches the end, where zipfile checks the CRC
    except PretrainedError:
      raise
    except Exception as e:  # zipfile.BadZipFile (a CRC), zlib.error, EOFError...
      raise self._corrupt(f'cannot be read ({type(e).__name__}: {e})', key) from e
    if header.fortran_order:
      return flat.reshape(header.shape[::-1]).transpose()
    return flat.reshape(header.shape)


def load_converted(path) -> tuple[dict[str, dict[str, np.ndarray]], Optional[str]]:
  """({module path: {param name: array}}, the stored variant or None) of a converted
  file, local or remote, with no pickle and every header checked before any data is
  inflated (`ConvertedFile`). Without a model to compare with, every parameter entry is
  read: `check.load_pretrained` checks the shapes first.

  Raises CorruptCheckpointError when the archive is unreadable or not ours.
  """
  with ConvertedFile(path) as archive:
    return archive.read_params(), archive.variant
