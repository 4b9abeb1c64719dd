"""DeepMind's released NFNet weights, read without running anything they contain.

DeepMind released NFNet-F0..F6 with its Haiku code (deepmind-research/nfnets,
https://github.com/deepmind/deepmind-research/tree/master/nfnets) as `F{k}_haiku.npz`.
Despite the suffix those files are *pickles* (written with dill, protocol 3) of a Haiku
`FlatMapping`: module path -> `FlatMapping` of parameter name -> float32 ndarray, conv
weights HWIO. Unpickling runs whatever code the file's author chose, so this module never
hands such a file to `pickle`/`dill`/`np.load(allow_pickle=True)`. Instead:

1. A static scan (`pickletools.genops`, which executes nothing) reads every opcode
   before anything is unpickled. Truncated or trailing data and opcodes a parameter dict
   does not need (INST, OBJ, NEWOBJ, NEWOBJ_EX, PERSID, BINPERSID, EXT1/2/4, protocol-5
   buffers, the protocol-0 text opcodes) are refused here, naming the offending opcode.
2. `SafeUnpickler.find_class` is the one place globals are admitted, whether the stream
   names them with GLOBAL or STACK_GLOBAL: exactly the globals such a file references
   (`ADMITTED_GLOBALS`), each resolved to a *stand-in*, never the real object, so no
   numpy, haiku or dill callable is reachable from the stream at all. The stand-ins
   validate their arguments: `dill._dill._import_module` only for numpy's C module,
   `dill._dill._get_attr` only for (that module, '_reconstruct'), numpy's `_reconstruct`
   only for (ndarray, (0,), b'b'), `numpy.dtype` only for plain numeric dtype strings.
3. The arrays come out as placeholders holding (shape, dtype, raw bytes), each checked
   to hold exactly its shape's byte count (computed in Python ints: no overflow). Before
   any array is built, the bytes of all of them together must fit in the file: the
   stream's memo lets many arrays share one bytes object, so a small file could
   otherwise make the loader allocate without bound. A caller that knows the model
   (`check.py`) then checks their shapes (`check=`) before the arrays are built with
   `np.frombuffer`.

NumPy and the standard library only (no models, haiku or jax): `check.py` checks the
loaded tree against a model.
"""

import hashlib
import os
import pickle
import pickletools
import re
import reprlib
from typing import Any, Callable, Optional
import warnings

import numpy as np

from nfnet_jax.weights.errors import (
  CorruptCheckpointError,
  PretrainedError,
  UnsafePickleError,
  UnverifiedChecksumWarning,
)

# Third-party MD5s of the released files. DeepMind did not publish checksums, so these
# are unverified: a mismatch warns instead of refusing.
RELEASED_MD5 = {
  'F0': '0a41039da1cb43adf47f1b7d86ddfe0f',
  'F1': 'c9126bbfaf855f9ddb7ff3b902558781',
  'F2': '7a018d8d1498020e2f5a8719a1e7f53f',
  'F3': 'd8e1e78d26db659c486150dbaccbe78a',
  'F4': 'f5974a7e3388aa81b91a9f1403e759a4',
  'F5': '8639e925de951030651ac775b9f915c3',
  'F6': 'b16cca40ac1ecec2bd5e3273866da0c1',
}
# Bytes of the released files; only F0's is on record (the tests rebuild a stream of
# exactly this size from the model's shapes).
RELEASED_SIZES = {'F0': 285_976_842}

PICKLE_MAGIC = b'\x80'
_MAX_BYTES = int(np.iinfo(np.intp).max)  # no array spans more
ZIP_MAGIC = b'PK\x03\x04'
_RELEASED_NAME = re.compile(r'(?<![A-Za-z0-9])(F[0-7])_haiku')

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short(value) -> str:
  """A bounded repr of something read from the file (it may be huge or deeply nested)."""
  try:
    return _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except
    return f'<{type(value).__name__}>'


# Stand-ins for the admitted globals: nothing here imports haiku or dill, or hands a
# real numpy callable to the unpickler.


class _Token:
  """A named placeholder for a global that may only appear as an argument."""

  __slots__ = ('_name',)

  def __init__(self, name: str):
    self._name = name

  def __repr__(self):
    return f'<{self._name}>'

  def __call__(self, *args, **kwargs):
    raise UnsafePickleError(
      f'the pickle calls {self._name}, which a parameter file only passes as an '
      'argument; refusing it'
    )

  def __setstate__(self, state):
    raise UnsafePickleError(f'the pickle tries to set state on {self._name}; refusing it')


class _StandIn:
  """A callable stand-in for an admitted global. Slotted, with a refusing
  `__setstate__`, so BUILD cannot alter it (plain functions would take attributes)."""

  __slots__ = ('_name', '_fn')

  def __init__(self, name: str, fn):
    self._name, self._fn = name, fn

  def __repr__(self):
    return f'<stand-in for {self._name}>'

  def __call__(self, *args, **kwargs):
    if kwargs:
      raise UnsafePickleError(f'{self._name} called with keyword arguments; refusing it')
    return self._fn(*args)

  def __setstate__(self, state):
    raise UnsafePickleError(f'the pickle tries to set state on {self._name}; refusing it')


_NDARRAY = _Token('numpy.ndarray')

# Module names dill writes for numpy's C module (`_reconstruct.__self__`): numpy>=1.16
# (`_multiarray_umath`, under `numpy.core` for numpy 1.x and `numpy._core` for 2.x); older
# numpy's C module was `multiarray` itself.
_NUMPY_C_MODULES = frozenset(
  {
    'numpy.core._multiarray_umath',
    'numpy._core._multiarray_umath',
    'numpy.core.multiarray',
    'numpy._core.multiarray',
  }
)


class _NumpyCModule(_Token):
  """What `dill._dill._import_module(<numpy's C module>)` evaluates to."""

  __slots__ = ()


def _import_module(import_name, safe=False):
  """Stand-in for dill's `_import_module`: numpy's C module, and nothing else."""
  del safe
  if not isinstance(import_name, str) or import_name not in _NUMPY_C_MODULES:
    raise UnsafePickleError(
      f'dill._dill._import_module({_short(import_name)}) refused: a parameter file '
      f"only imports numpy's C module ({', '.join(sorted(_NUMPY_C_MODULES))})"
    )
  return _NumpyCModule(import_name)


def _get_attr(obj, name):
  """Stand-in for dill's `_get_attr`: `_reconstruct` of numpy's C module, only."""
  if not isinstance(obj, _NumpyCModule) or name != '_reconstruct':
    raise UnsafePickleError(
      f'dill._dill._get_attr({_short(obj)}, {_short(name)}) refused: a parameter file '
      "only fetches '_reconstruct' from numpy's C module"
    )
  return _RECONSTRUCT


class _DType:
  """Placeholder for a numpy dtype (built from a validated type string + state)."""

  __slots__ = ('dtype', '_built')

  def __init__(self, dtype: np.dtype):
    self.dtype, self._built = dtype, False

  def __setstate__(self, state):
    # numpy's dtype state for plain numeric types: (3, byteorder, None, None, None,
    # -1, -1, 0). Anything else (structured, subarray, object, metadata) is refused.
    if (
      not isinstance(state, tuple)
      or len(state) != 8
      or state[0] != 3
      or state[1] not in ('<', '>', '|', '=')
      or state[2:5] != (None, None, None)
      or state[5:] != (-1, -1, 0)
      or self._built
    ):
      raise UnsafePickleError(
        f'numpy.dtype state {_short(state)} is not that of a plain numeric dtype'
      )
    if state[1] in '<>' and self.dtype.itemsize > 1:
      self.dtype = self.dtype.newbyteorder(state[1])
    self._built = True


_DTYPE_STRING = re.compile(r'^[biufc][0-9]{1,2}$')


def _is_flag(value) -> bool:
  # numpy 1.x pickled dtypes as dtype('f4', 0, 1) (ints), newer numpy as (False, True).
  return type(value) in (bool, int) and value in (0, 1)  # pylint: disable=unidiomatic-typecheck


def _dtype(obj, align=False, copy=False):
  """Stand-in for `numpy.dtype(obj, align, copy)`: plain numeric types only."""
  if (
    not isinstance(obj, str)
    or not _DTYPE_STRING.match(obj)
    or not _is_flag(align)
    or not _is_flag(copy)
  ):
    raise UnsafePickleError(
      f'numpy.dtype({_short(obj)}, {_short(align)}, {_short(copy)}) refused: parameter '
      "files hold plain numeric arrays (e.g. numpy.dtype('f4', False, True))"
    )
  try:
    dtype = np.dtype(obj)
  except TypeError as e:
    raise UnsafePickleError(f'numpy.dtype({obj!r}) is not a valid dtype') from e
  return _DType(dtype)


class _Array:
  """Placeholder for an ndarray: `_reconstruct` makes it, BUILD fills it in."""

  __slots__ = ('shape', 'dtype', 'fortran', 'raw')

  def __init__(self):
    self.shape = self.dtype = self.raw = None
    self.fortran = False

  def __setstate__(self, state):
    # ndarray state: (version 1, shape, dtype, is_fortran, raw bytes).
    if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
      raise UnsafePickleError(
        f'unexpected ndarray state layout ({type(state).__name__} '
        f'of length {len(state) if isinstance(state, tuple) else "?"})'
      )
    _, shape, dtype, fortran, raw = state
    if self.raw is not None:
      raise UnsafePickleError('an ndarray was given state twice')
    if (
      not isinstance(shape, tuple)
      or len(shape) > 32
      or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
      raise UnsafePickleError(f'ndarray shape {_short(shape)} is not a tuple of sizes')
    if not isinstance(dtype, _DType) or not isinstance(fortran, bool):
      raise UnsafePickleError('ndarray state does not hold a plain numeric dtype')
    extent = dtype.dtype.itemsize  # what NumPy checks: an empty side counts as 1
    for d in shape:  # Python ints: a product NumPy's int64 would wrap stays exact
      extent *= max(d, 1)
    if extent > _MAX_BYTES:
      raise CorruptCheckpointError(
        f'an array of shape {_short(shape)} {dtype.dtype} would span {extent:.3e} bytes, '
        'more than any array can hold: the file is corrupt'
      )
    if not isinstance(raw, bytes):
      raise UnsafePickleError(
        f'ndarray data is a {type(raw).__name__}, not bytes (object arrays and '
        'protocol-2 encodings are not parameter files)'
      )
    expected = dtype.dtype.itemsize
    for d in shape:
      expected *= d
    if len(raw) != expected:
      raise CorruptCheckpointError(
        f'an array of shape {_short(shape)} {dtype.dtype} should hold {expected:,} bytes, the '
        f'file gives {len(raw):,}: the file is corrupt'
      )
    self.shape, self.dtype, self.fortran, self.raw = shape, dtype.dtype, fortran, raw

  def placeholder(self) -> np.ndarray:
    """A zero-stride read-only array of this shape and dtype (one element's memory)."""
    return np.broadcast_to(np.zeros((), self.dtype), self.shape)

  def to_numpy(self) -> np.ndarray:
    if self.raw is None:
      raise CorruptCheckpointError('an ndarray in the file was never given its data')
    flat = np.frombuffer(self.raw, dtype=self.dtype)
    arr = flat.reshape(self.shape, order='F' if self.fortran else 'C')
    arr = np.array(arr, dtype=self.dtype.newbyteorder('='), order='C')  # own, writable
    self.raw = None  # let the bytes go as soon as the array is built
    return arr


def _reconstruct(subtype, shape, typecode):
  """Stand-in for numpy's `_reconstruct(ndarray, (0,), b'b')`."""
  if subtype is not _NDARRAY or shape != (0,) or typecode != b'b':
    raise UnsafePickleError(
      f'numpy _reconstruct({_short(subtype)}, {_short(shape)}, {_short(typecode)}) '
      "refused: parameter files only call it as _reconstruct(numpy.ndarray, (0,), b'b')"
    )
  return _Array()


def _flat_mapping(mapping):
  """Stand-in for `haiku._src.data_structures.FlatMapping(dict)`: a plain dict."""
  if not isinstance(mapping, dict):
    raise UnsafePickleError(
      f'haiku FlatMapping called with a {type(mapping).__name__}, expected one dict'
    )
  return dict(mapping)


_RECONSTRUCT = _StandIn("numpy's _reconstruct", _reconstruct)

# Exactly the globals a released file (dill, protocol 3) or a plain protocol-3 pickle of
# the same tree references. Protocol 3 stores bytes natively, so numpy's protocol-2
# detour through `_codecs.encode` is not needed and not admitted.
ADMITTED_GLOBALS = {
  ('haiku._src.data_structures', 'FlatMapping'): _StandIn('FlatMapping', _flat_mapping),
  ('numpy', 'ndarray'): _NDARRAY,
  ('numpy', 'dtype'): _StandIn('numpy.dtype', _dtype),
  ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,  # plain pickle, numpy 1.x
  ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,  # plain pickle, numpy 2.x
  # dill wrote numpy's C function indirectly: _get_attr(_import_module(C module), name).
  ('dill._dill', '_import_module'): _StandIn('dill._dill._import_module', _import_module),
  ('dill._dill', '_get_attr'): _StandIn('dill._dill._get_attr', _get_attr),
}


def _refuse_global(module: str, name: str) -> UnsafePickleError:
  offender = f'{module}.{name}'
  if len(offender) > 200:
    offender = offender[:200] + '...'
  return UnsafePickleError(
    f'the pickle references the global {offender}, which a parameter file does '
    'not need (admitted: '
    + ', '.join(f'{m}.{n}' for m, n in ADMITTED_GLOBALS)
    + '); refusing to load it'
  )


class SafeUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only `ADMITTED_GLOBALS`, to safe stand-ins.

  `find_class` is where every global of the stream (GLOBAL and STACK_GLOBAL alike) is
  admitted or refused: the static scan leaves globals to it.
  """

  def find_class(self, module, name):
    try:
      return ADMITTED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise _refuse_global(str(module), str(name)) from None

  def persistent_load(self, pid):
    raise UnsafePickleError(f'the pickle uses a persistent id ({_short(pid)}); refusing it')


# Opcodes a protocol-2..4 pickle of a dict of dicts of numeric arrays can use. Everything
# else is refused by the scan: INST/OBJ/NEWOBJ/NEWOBJ_EX (instantiate a class),
# PERSID/BINPERSID (persistent_load), EXT1/2/4 (the copyreg extension registry),
# BYTEARRAY8/NEXT_BUFFER/READONLY_BUFFER (protocol-5 buffers), sets, and the protocol-0
# text opcodes. GLOBAL and STACK_GLOBAL only ever reach `SafeUnpickler.find_class`;
# REDUCE and BUILD only ever reach the admitted stand-ins.
_ALLOWED_OPCODES = frozenset(
  """
    PROTO FRAME STOP MARK POP POP_MARK DUP GLOBAL STACK_GLOBAL REDUCE BUILD
    EMPTY_DICT EMPTY_LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 APPEND APPENDS SETITEM SETITEMS
    BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET NONE NEWTRUE NEWFALSE BININT BININT1 BININT2
    LONG1 LONG4 BINFLOAT BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8
""".split()
)

_REFUSED_OPCODES = {
  'INST': 'it instantiates a class named in the stream',
  'OBJ': 'it instantiates a class from the stack',
  **dict.fromkeys(('NEWOBJ', 'NEWOBJ_EX'), 'it calls cls.__new__ for a class from the stack'),
  **dict.fromkeys(('PERSID', 'BINPERSID'), 'it calls persistent_load'),
  **dict.fromkeys(('EXT1', 'EXT2', 'EXT4'), 'it resolves a global through the copyreg registry'),
}


class _BoundedReader:
  """File wrapper for the scan: never asks the OS for more than the file holds (a
  forged length field must not make `read` allocate gigabytes)."""

  def __init__(self, f, size: int):
    self._f, self._size = f, size
    self.md5 = hashlib.md5(usedforsecurity=False)  # the scan reads every byte once

  def read(self, n: int = -1) -> bytes:
    left = self._size - self._f.tell()
    data = self._f.read(left if n is None or n < 0 else min(n, left))
    self.md5.update(data)
    return data

  def readline(self) -> bytes:
    data = self._f.readline()
    self.md5.update(data)
    return data

  def tell(self) -> int:
    return self._f.tell()


def _size_hint(path: str) -> str:
  match = _RELEASED_NAME.search(os.path.basename(path))
  if match and match.group(1) in RELEASED_SIZES:
    return f' ({match.group(1)}_haiku.npz should be {RELEASED_SIZES[match.group(1)]:,} bytes)'
  return ''


def _corrupt(path: str, size: int, what: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(
    f'{path} ({size:,} bytes) is truncated or corrupt: {what}{_size_hint(path)}. Re-download it.'
  )


def _scan_pickle(f, size: int, path: str) -> str:
  """Reads every opcode without executing anything; refuses opcodes a parameter file
  does not need, a broken stream and bytes after its end. Globals are left to
  `SafeUnpickler.find_class`.

  Returns the file's MD5 (the scan reads it whole)."""
  reader = _BoundedReader(f, size)
  try:
    for opcode, arg, pos in pickletools.genops(reader):
      if opcode.name not in _ALLOWED_OPCODES:
        why = _REFUSED_OPCODES.get(opcode.name, 'a protocol-3 parameter file never uses it')
        raise UnsafePickleError(
          f'{path}: pickle opcode {opcode.name} at byte {pos} refused ({why}); nothing '
          'from the file was run'
        )
      if opcode.name == 'PROTO' and not 2 <= arg <= 5:
        raise _corrupt(path, size, f'unknown pickle protocol {arg}')
  except PretrainedError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _corrupt(
      path, size, f'the pickle stream breaks off or is garbled near byte {reader.tell():,} ({e})'
    ) from None
  end = reader.tell()
  if end != size:
    raise _corrupt(
      path, size, f'{size - end:,} unexpected bytes after the pickle ends at byte {end:,}'
    )
  return reader.md5.hexdigest()


def _placeholders(tree: Any, path: str) -> dict[str, dict[str, _Array]]:
  """The unpickled tree, checked to be a dict of dicts of array placeholders."""
  if not isinstance(tree, dict):
    raise CorruptCheckpointError(
      f'{path} holds a {type(tree).__name__}, not a Haiku parameter dict '
      '(module path -> {param name -> array})'
    )
  for module, params in tree.items():
    if not isinstance(module, str) or not isinstance(params, dict):
      raise CorruptCheckpointError(
        f'{path}: entry {_short(module)} is not a module path mapping to a dict of arrays'
      )
    for name, value in params.items():
      if not isinstance(name, str) or not isinstance(value, _Array):
        raise CorruptCheckpointError(
          f'{path}: {_short(module)}/{_short(name)} is a {type(value).__name__}, not an array'
        )
      if value.raw is None:
        raise CorruptCheckpointError(
          f'{path}: {module}/{name} was never given its data: the file is corrupt'
        )
  return tree


def _check_total(tree: dict[str, dict[str, _Array]], path: str, size: int) -> None:
  """Refuses arrays whose bytes together exceed the file's. Each distinct array is
  built as a copy of its bytes, and a writer pickles each array's bytes once; only a
  crafted stream makes several arrays share one bytes object through the memo (n
  arrays of a file's worth of bytes: n times the file in memory)."""
  arrays = {id(a): a for params in tree.values() for a in params.values()}
  total = sum(len(a.raw) for a in arrays.values())
  if total > size:
    raise CorruptCheckpointError(
      f'{path} ({size:,} bytes) declares {len(arrays)} arrays of {total:,} bytes in all, '
      'more than the file holds (arrays share their data through the pickle memo, which '
      'no writer of parameter files does): the file is corrupt or crafted; re-download it'
    )


def _materialize(tree: dict[str, dict[str, _Array]]) -> dict[str, dict[str, np.ndarray]]:
  """Turns the checked dict of dicts of placeholders into numpy arrays."""
  built = {}
  out = {}
  for module, params in tree.items():
    out[module] = {}
    for name, value in params.items():
      if id(value) not in built:
        built[id(value)] = value.to_numpy()
      out[module][name] = built[id(value)]
  return out


def file_md5(path) -> str:
  """MD5 hex digest of a local file, read in chunks."""
  digest = hashlib.md5(usedforsecurity=False)
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def released_variant_from_name(path) -> Optional[str]:
  """'F3' for '.../F3_haiku.npz' (DeepMind's file names), else None."""
  match = _RELEASED_NAME.search(os.path.basename(os.fspath(path)))
  return match.group(1) if match else None


def _check_md5(path: str, size: int, md5: str, variant: Optional[str]) -> None:
  """Warns (loudly, without refusing) when the MD5 is not the listed one."""
  expected_variant = variant if variant in RELEASED_MD5 else released_variant_from_name(path)
  if expected_variant in RELEASED_MD5:
    if md5 == RELEASED_MD5[expected_variant]:
      return
    size_note = ''
    if expected_variant in RELEASED_SIZES:
      size_note = (
        f'; its size is {size:,} bytes, the released file is {RELEASED_SIZES[expected_variant]:,}'
      )
    others = [v for v, h in RELEASED_MD5.items() if h == md5]
    other_note = f' (it is the listed MD5 of {others[0]})' if others else ''
    warnings.warn(
      f'CHECKSUM MISMATCH: {path} has MD5 {md5}{other_note}, but the third-party list '
      f'gives {RELEASED_MD5[expected_variant]} for {expected_variant}_haiku.npz'
      f'{size_note}. Those figures are unverified (not published by DeepMind), so '
      'this is not proof of tampering, but the file may be corrupt, modified or a '
      'different release: re-download it if in doubt. Loading it anyway.',
      UnverifiedChecksumWarning,
      stacklevel=3,
    )
  elif md5 not in RELEASED_MD5.values():
    warnings.warn(
      f'CHECKSUM UNKNOWN: {path} (MD5 {md5}) matches none of the released F0..F6 '
      'files in the third-party list (whose figures are themselves unverified): it '
      'is not a known DeepMind release. Loading it anyway; its contents are checked '
      'but not vouched for.',
      UnverifiedChecksumWarning,
      stacklevel=3,
    )


def load_released_params(
  path,
  variant: Optional[str] = None,
  *,
  verify_md5: bool = True,
  check: Optional[Callable[[dict[str, dict[str, np.ndarray]]], None]] = None,
) -> dict[str, dict[str, np.ndarray]]:
  """Loads DeepMind's released `F{k}_haiku.npz` (a dill pickle) without unpickling it
  unsafely.

  Args:
    path: the file (local).
    variant: which release this should be ('F0'..'F6'), for the MD5 comparison;
      default: from the file name (`F3_haiku.npz` -> 'F3').
    verify_md5: compare the MD5 with the third-party list and warn on a mismatch.
    check: called, before any array is built, with {module path: {param name:
      placeholder}} (zero-stride read-only arrays of each array's shape and dtype); it
      raises to refuse the file (`check.py` compares the shapes with the model's).

  Returns:
    {module path: {param name: ndarray}}, arrays as stored (float32 for the releases).

  Raises:
    UnsafePickleError: the file references a global or opcode a parameter file does
      not need (nothing from the file has run).
    CorruptCheckpointError: empty, truncated, not a pickle, or not a parameter tree.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  if size == 0:
    raise CorruptCheckpointError(
      f'{path} is empty (0 bytes): the download failed or was truncated'
      f'{_size_hint(path)}. Re-download it.'
    )
  with open(path, 'rb') as f:
    head = f.read(8)
    if head.startswith(ZIP_MAGIC):
      raise CorruptCheckpointError(
        f'{path} is a real .npz (zip) archive, not a released pickle: if it was written '
        'by nfnet_jax.convert, load it with nfnet_jax.weights.load_pretrained'
      )
    if not head.startswith(PICKLE_MAGIC):
      raise CorruptCheckpointError(
        f'{path} is not a pickle of protocol 2 or later (it starts with {head!r}); the '
        'released files are protocol-3 pickles: the file is corrupt or not a release'
        f'{_size_hint(path)}. Re-download it.'
      )
    f.seek(0)
    md5 = _scan_pickle(f, size, path)
    f.seek(0)
    unpickler = SafeUnpickler(f)
    try:
      tree = unpickler.load()
    except PretrainedError as e:  # the stand-ins' refusals do not know the file's name
      if str(e).startswith(path):
        raise
      raise type(e)(f'{path}: {e}') from None
    except Exception as e:  # the stand-ins refuse; anything else is a malformed stream
      raise CorruptCheckpointError(
        f'{path}: the pickle is malformed for a parameter file ({type(e).__name__}: '
        f'{e}){_size_hint(path)}'
      ) from e
    del unpickler  # drop its memo, so the raw bytes go as each array is built
  tree = _placeholders(tree, path)
  _check_total(tree, path, size)
  if verify_md5:  # after the refusals: a refused file gets no checksum warning first
    _check_md5(path, size, md5, variant)
  if check is not None:  # after the warning, which may name the release the file is
    check({m: {n: a.placeholder() for n, a in p.items()} for m, p in tree.items()})
  return _materialize(tree)
