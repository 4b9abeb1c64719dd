"""DeepMind's released NFNet weights: safe loading, shape checks, pickle-free conversion.

DeepMind published NFNet-F0..F6 as `F{k}_haiku.npz`. Despite the suffix those files
are *pickles* (written with dill, protocol 3) of a Haiku `FlatMapping`: module path ->
`FlatMapping` of parameter name -> float32 ndarray, conv weights HWIO. Unpickling runs
whatever code the file's author chose, so this module never hands such a file to
`pickle`/`dill`/`np.load(allow_pickle=True)`. Instead:

1. A static scan (`pickletools.genops`, which executes nothing) reads every opcode
   before anything is unpickled. Truncated or trailing data, opcodes a parameter dict
   does not need (INST, OBJ, NEWOBJ, NEWOBJ_EX, PERSID, BINPERSID, EXT1/2/4,
   protocol-5 buffers, the protocol-0 text opcodes) and `GLOBAL`s outside the allowlist
   are refused here, naming the offending opcode or `module.name`.
2. `SafeUnpickler.find_class` admits exactly the globals such a file references
   (`ADMITTED_GLOBALS`) and returns *stand-ins*, never the real objects: no numpy, haiku
   or dill callable is reachable from the stream at all. The stand-ins validate their
   arguments: `dill._dill._import_module` only for numpy's C module, `dill._dill._get_attr`
   only for (that module, '_reconstruct'), numpy's `_reconstruct` only for
   (ndarray, (0,), b'b'), `numpy.dtype` only for plain numeric dtype strings.
3. The arrays come out as placeholders holding (shape, dtype, raw bytes); once the
   stream is fully read they are rebuilt with `np.frombuffer`, after checking the byte
   count matches the shape.

`load_pretrained` then checks every module path, parameter name and shape against the
model (`check_params`; any family: NFNet, NF-ResNet or NF-RegNet, told by the variant),
and `convert` writes a pickle-free `.npz` (flat keys
`module_path + '//' + param_name`, loadable with `np.load(..., allow_pickle=False)`).
"""
import functools
import hashlib
import inspect
import os
import pickle
import pickletools
import re
import reprlib
import tempfile
import warnings
from typing import Any, Mapping, Optional

import numpy as np

# Spec section 5: third-party MD5s of the released files. Unverified (not published by
# DeepMind), hence a mismatch warns instead of refusing.
RELEASED_MD5 = {
    'F0': '0a41039da1cb43adf47f1b7d86ddfe0f',
    'F1': 'c9126bbfaf855f9ddb7ff3b902558781',
    'F2': '7a018d8d1498020e2f5a8719a1e7f53f',
    'F3': 'd8e1e78d26db659c486150dbaccbe78a',
    'F4': 'f5974a7e3388aa81b91a9f1403e759a4',
    'F5': '8639e925de951030651ac775b9f915c3',
    'F6': 'b16cca40ac1ecec2bd5e3273866da0c1',
}
RELEASED_SIZES = {'F0': 285_976_842}  # bytes; the only size the spec records.

# Our converted format: flat keys `module_path + SEPARATOR + param_name`. Haiku module
# paths contain '/' and '~' but never '//' (module names cannot be empty), and parameter
# names contain no '/', so the split is unambiguous.
SEPARATOR = '//'
# The module replaced when fine-tuning to new classes: `classifier_module(variant)` for
# every family; this is NFNet's.
CLASSIFIER = 'NFNet/~/linear'
FORMAT_KEY = '__format__'
VARIANT_KEY = '__variant__'
CONVERTED_FORMAT = 'nfnet_jax.params.v1'

_PICKLE_MAGIC = b'\x80'
_ZIP_MAGIC = b'PK\x03\x04'
_RELEASED_NAME = re.compile(r'(?<![A-Za-z0-9])(F[0-7])_haiku')


class PretrainedError(ValueError):
  """A checkpoint file could not be used (base class of the errors below)."""


class UnsafePickleError(PretrainedError, pickle.UnpicklingError):
  """The pickle references a global or opcode that a parameter file does not need."""


class CorruptCheckpointError(PretrainedError):
  """The file is empty, truncated, not a pickle / .npz, or not a parameter tree."""


class ParamsMismatchError(PretrainedError):
  """The parameters do not match the model's module paths, names or shapes."""


class UnverifiedChecksumWarning(UserWarning):
  """A released file's MD5 differs from the (unverified) third-party list."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short(value) -> str:
  """A bounded repr of something read from the file (it may be huge or deeply nested)."""
  try:
    return _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except
    return f'<{type(value).__name__}>'


# ---------------------------------------------------------------------------
# Stand-ins for the admitted globals. Nothing in here imports haiku, dill, or
# returns a real numpy callable to the unpickler.


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
        'argument; refusing it')

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
_NUMPY_C_MODULES = frozenset({
    'numpy.core._multiarray_umath', 'numpy._core._multiarray_umath',
    'numpy.core.multiarray', 'numpy._core.multiarray',
})


class _NumpyCModule(_Token):
  """What `dill._dill._import_module(<numpy's C module>)` evaluates to."""
  __slots__ = ()


def _import_module(import_name, safe=False):
  """Stand-in for dill's `_import_module`: numpy's C module, and nothing else."""
  del safe
  if not isinstance(import_name, str) or import_name not in _NUMPY_C_MODULES:
    raise UnsafePickleError(
        f'dill._dill._import_module({_short(import_name)}) refused: a parameter file '
        f'only imports numpy\'s C module ({", ".join(sorted(_NUMPY_C_MODULES))})')
  return _NumpyCModule(import_name)


def _get_attr(obj, name):
  """Stand-in for dill's `_get_attr`: `_reconstruct` of numpy's C module, only."""
  if not isinstance(obj, _NumpyCModule) or name != '_reconstruct':
    raise UnsafePickleError(
        f'dill._dill._get_attr({_short(obj)}, {_short(name)}) refused: a parameter file '
        "only fetches '_reconstruct' from numpy's C module")
  return _RECONSTRUCT


class _DType:
  """Placeholder for a numpy dtype (built from a validated type string + state)."""
  __slots__ = ('dtype', '_built')

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype
    self._built = False

  def __setstate__(self, state):
    # numpy's dtype state for plain numeric types: (3, byteorder, None, None, None,
    # -1, -1, 0). Anything else (structured, subarray, object, metadata) is refused.
    if (not isinstance(state, tuple) or len(state) != 8 or state[0] != 3
        or state[1] not in ('<', '>', '|', '=') or state[2:5] != (None, None, None)
        or state[5:] != (-1, -1, 0) or self._built):
      raise UnsafePickleError(
          f'numpy.dtype state {_short(state)} is not that of a plain numeric dtype')
    if state[1] in '<>' and self.dtype.itemsize > 1:
      self.dtype = self.dtype.newbyteorder(state[1])
    self._built = True


_DTYPE_STRING = re.compile(r'^[biufc][0-9]{1,2}$')


def _is_flag(value) -> bool:
  # numpy 1.x pickled dtypes as dtype('f4', 0, 1) (ints), newer numpy as (False, True).
  return type(value) in (bool, int) and value in (0, 1)  # pylint: disable=unidiomatic-typecheck


def _dtype(obj, align=False, copy=False):
  """Stand-in for `numpy.dtype(obj, align, copy)`: plain numeric types only."""
  if (not isinstance(obj, str) or not _DTYPE_STRING.match(obj)
      or not _is_flag(align) or not _is_flag(copy)):
    raise UnsafePickleError(
        f'numpy.dtype({_short(obj)}, {_short(align)}, {_short(copy)}) refused: parameter '
        "files hold plain numeric arrays (e.g. numpy.dtype('f4', False, True))")
  try:
    dtype = np.dtype(obj)
  except TypeError as e:
    raise UnsafePickleError(f'numpy.dtype({obj!r}) is not a valid dtype') from e
  return _DType(dtype)


class _Array:
  """Placeholder for an ndarray: `_reconstruct` makes it, BUILD fills it in."""
  __slots__ = ('shape', 'dtype', 'fortran', 'raw')

  def __init__(self):
    self.shape = None
    self.dtype = None
    self.fortran = False
    self.raw = None

  def __setstate__(self, state):
    # ndarray state: (version 1, shape, dtype, is_fortran, raw bytes).
    if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
      raise UnsafePickleError(f'unexpected ndarray state layout ({type(state).__name__} '
                              f'of length {len(state) if isinstance(state, tuple) else "?"})')
    _, shape, dtype, fortran, raw = state
    if self.raw is not None:
      raise UnsafePickleError('an ndarray was given state twice')
    if (not isinstance(shape, tuple) or len(shape) > 32 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise UnsafePickleError(f'ndarray shape {_short(shape)} is not a tuple of sizes')
    if not isinstance(dtype, _DType) or not isinstance(fortran, bool):
      raise UnsafePickleError('ndarray state does not hold a plain numeric dtype')
    if not isinstance(raw, bytes):
      raise UnsafePickleError(
          f'ndarray data is a {type(raw).__name__}, not bytes (object arrays and '
          'protocol-2 encodings are not parameter files)')
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.dtype.itemsize
    if len(raw) != expected:
      raise CorruptCheckpointError(
          f'an array of shape {shape} {dtype.dtype} should hold {expected} bytes, the '
          f'file gives {len(raw)}: the file is corrupt')
    self.shape, self.dtype, self.fortran, self.raw = shape, dtype.dtype, fortran, raw

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
        "refused: parameter files only call it as _reconstruct(numpy.ndarray, (0,), b'b')")
  return _Array()


def _flat_mapping(mapping):
  """Stand-in for `haiku._src.data_structures.FlatMapping(dict)`: a plain dict."""
  if not isinstance(mapping, dict):
    raise UnsafePickleError(
        f'haiku FlatMapping called with a {type(mapping).__name__}, expected one dict')
  return dict(mapping)


_RECONSTRUCT = _StandIn("numpy's _reconstruct", _reconstruct)

# Exactly the globals a released file (dill, protocol 3) or a plain protocol-3 pickle of
# the same tree references. Protocol 3 stores bytes natively, so numpy's protocol-2
# detour through `_codecs.encode` is not needed and not admitted.
ADMITTED_GLOBALS = {
    ('haiku._src.data_structures', 'FlatMapping'): _StandIn('FlatMapping', _flat_mapping),
    ('numpy', 'ndarray'): _NDARRAY,
    ('numpy', 'dtype'): _StandIn('numpy.dtype', _dtype),
    ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,   # plain pickle, numpy 1.x
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
      + ', '.join(f'{m}.{n}' for m, n in ADMITTED_GLOBALS) + '); refusing to load it')


class SafeUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only `ADMITTED_GLOBALS`, to safe stand-ins."""

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
# text opcodes. REDUCE and BUILD only ever reach the admitted stand-ins.
_ALLOWED_OPCODES = frozenset({
    'PROTO', 'FRAME', 'STOP', 'MARK', 'POP', 'POP_MARK', 'DUP',
    'GLOBAL', 'STACK_GLOBAL', 'REDUCE', 'BUILD',
    'EMPTY_DICT', 'EMPTY_LIST', 'EMPTY_TUPLE', 'TUPLE', 'TUPLE1', 'TUPLE2', 'TUPLE3',
    'APPEND', 'APPENDS', 'SETITEM', 'SETITEMS',
    'BINPUT', 'LONG_BINPUT', 'MEMOIZE', 'BINGET', 'LONG_BINGET',
    'NONE', 'NEWTRUE', 'NEWFALSE', 'BININT', 'BININT1', 'BININT2', 'LONG1', 'LONG4',
    'BINFLOAT', 'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8',
    'BINBYTES', 'SHORT_BINBYTES', 'BINBYTES8',
})


_REFUSED_OPCODES = {
    'INST': 'it instantiates a class named in the stream',
    'OBJ': 'it instantiates a class from the stack',
    'NEWOBJ': 'it calls cls.__new__ for a class from the stack',
    'NEWOBJ_EX': 'it calls cls.__new__ for a class from the stack',
    'PERSID': 'it calls persistent_load', 'BINPERSID': 'it calls persistent_load',
    'EXT1': 'it resolves a global through the copyreg registry',
    'EXT2': 'it resolves a global through the copyreg registry',
    'EXT4': 'it resolves a global through the copyreg registry',
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
    return (f' ({match.group(1)}_haiku.npz should be {RELEASED_SIZES[match.group(1)]:,} '
            'bytes)')
  return ''


def _corrupt(path: str, size: int, what: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(
      f'{path} ({size:,} bytes) is truncated or corrupt: {what}{_size_hint(path)}. '
      'Re-download it.')


def _scan_pickle(f, size: int, path: str) -> str:
  """Reads every opcode without executing anything; refuses what is not needed.

  Returns the file's MD5 (the scan reads it whole)."""
  reader = _BoundedReader(f, size)
  try:
    for opcode, arg, pos in pickletools.genops(reader):
      if opcode.name not in _ALLOWED_OPCODES:
        why = _REFUSED_OPCODES.get(opcode.name, 'a protocol-3 parameter file never uses it')
        raise UnsafePickleError(
            f'{path}: pickle opcode {opcode.name} at byte {pos} refused ({why}); nothing '
            'from the file was run')
      if opcode.name == 'PROTO' and not 2 <= arg <= 5:
        raise _corrupt(path, size, f'unknown pickle protocol {arg}')
      if opcode.name == 'GLOBAL':
        module, _, name = arg.partition(' ')
        if (module, name) not in ADMITTED_GLOBALS:
          raise _refuse_global(module, name)
  except PretrainedError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _corrupt(path, size, f'the pickle stream breaks off or is garbled near byte '
                   f'{reader.tell():,} ({e})') from None
  end = reader.tell()
  if end != size:
    raise _corrupt(path, size, f'{size - end:,} unexpected bytes after the pickle ends '
                   f'at byte {end:,}')
  return reader.md5.hexdigest()


def _materialize(tree: Any, path: str) -> dict[str, dict[str, np.ndarray]]:
  """Turns the unpickled dict of dicts of placeholders into numpy arrays."""
  if not isinstance(tree, dict):
    raise CorruptCheckpointError(
        f'{path} holds a {type(tree).__name__}, not a Haiku parameter dict '
        '(module path -> {param name -> array})')
  built = {}
  out = {}
  for module, params in tree.items():
    if not isinstance(module, str) or not isinstance(params, dict):
      raise CorruptCheckpointError(
          f'{path}: entry {_short(module)} is not a module path mapping to a dict of '
          'arrays')
    out[module] = {}
    for name, value in params.items():
      if not isinstance(name, str) or not isinstance(value, _Array):
        raise CorruptCheckpointError(
            f'{path}: {_short(module)}/{_short(name)} is a {type(value).__name__}, not '
            'an array')
      if id(value) not in built:
        built[id(value)] = value.to_numpy()
      out[module][name] = built[id(value)]
  return out


def file_md5(path) -> str:
  """MD5 hex digest of a file, read in chunks."""
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
      size_note = (f'; its size is {size:,} bytes, the released file is '
                   f'{RELEASED_SIZES[expected_variant]:,}')
    others = [v for v, h in RELEASED_MD5.items() if h == md5]
    other_note = f' (it is the listed MD5 of {others[0]})' if others else ''
    warnings.warn(
        f'CHECKSUM MISMATCH: {path} has MD5 {md5}{other_note}, but the third-party list '
        f'gives {RELEASED_MD5[expected_variant]} for {expected_variant}_haiku.npz'
        f'{size_note}. Those figures are unverified (not published by DeepMind), so '
        'this is not proof of tampering, but the file may be corrupt, modified or a '
        'different release: re-download it if in doubt. Loading it anyway.',
        UnverifiedChecksumWarning, stacklevel=3)
  elif md5 not in RELEASED_MD5.values():
    warnings.warn(
        f'CHECKSUM UNKNOWN: {path} (MD5 {md5}) matches none of the released F0..F6 '
        'files in the third-party list (whose figures are themselves unverified): it '
        'is not a known DeepMind release. Loading it anyway; its contents are checked '
        'but not vouched for.', UnverifiedChecksumWarning, stacklevel=3)


def load_released_params(path, variant: Optional[str] = None, *,
                         verify_md5: bool = True) -> dict[str, dict[str, np.ndarray]]:
  """Loads DeepMind's released `F{k}_haiku.npz` (a dill pickle) without unpickling it
  unsafely.

  Args:
    path: the file.
    variant: which release this should be ('F0'..'F6'), for the MD5 comparison;
      default: from the file name (`F3_haiku.npz` -> 'F3').
    verify_md5: compare the MD5 with the third-party list and warn on a mismatch.

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
        f'{_size_hint(path)}. Re-download it.')
  with open(path, 'rb') as f:
    head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
      raise CorruptCheckpointError(
          f'{path} is a real .npz (zip) archive, not a released pickle: if it was written '
          'by nfnet_jax.convert, load it with nfnet_jax.pretrained.load_pretrained')
    if not head.startswith(_PICKLE_MAGIC):
      raise CorruptCheckpointError(
          f'{path} is not a pickle of protocol 2 or later (it starts with {head!r}); the '
          'released files are protocol-3 pickles: the file is corrupt or not a release'
          f'{_size_hint(path)}. Re-download it.')
    f.seek(0)
    md5 = _scan_pickle(f, size, path)
    if verify_md5:
      _check_md5(path, size, md5, variant)
    f.seek(0)
    unpickler = SafeUnpickler(f)
    try:
      tree = unpickler.load()
    except PretrainedError:
      raise
    except Exception as e:  # the stand-ins refuse; anything else is a malformed stream
      raise CorruptCheckpointError(
          f'{path}: the pickle is malformed for a parameter file ({type(e).__name__}: '
          f'{e}){_size_hint(path)}') from e
    del unpickler  # drop its memo, so the raw bytes go as each array is built
  return _materialize(tree, path)


# ---------------------------------------------------------------------------
# Checking against the model.


def family_of(variant: str) -> str:
  """'NFNet', 'NFResNet' or 'NFRegNet' (an unknown variant lists every family's)."""
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  return models.family_of_variant(variant)


def _root(family: str, model_kwargs: Mapping) -> str:
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  return model_kwargs.get('name', models.ROOT_MODULES[family])


def classifier_module(variant: str, **model_kwargs) -> str:
  """The classifier's module path: 'NFNet/~/linear', 'NF_ResNet/~/linear', ..."""
  return f'{_root(family_of(variant), model_kwargs)}/~/linear'


@functools.lru_cache(maxsize=32)
def _expected_shapes(variant: str, num_classes: int, kwargs: tuple) -> dict:
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  family = family_of(variant)

  def forward(x):
    return models.MODEL_FAMILIES[family](num_classes, variant, **dict(kwargs))(x, False)

  try:
    shapes = jax.eval_shape(hk.transform(forward).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  except TypeError as e:   # an argument another family takes (group_size for NF-ResNet)
    raise ParamsMismatchError(f'{family} {variant}: {e}') from None
  return {m: {n: tuple(s.shape) for n, s in p.items()} for m, p in shapes.items()}


def expected_param_shapes(variant: str = 'F0', num_classes: int = 1000,
                          **model_kwargs) -> dict[str, dict[str, tuple]]:
  """{module path: {param name: shape}} of the model `variant` belongs to (`NFNet`,
  `NFResNet` or `NFRegNet`), built as `Family(num_classes, variant, **model_kwargs)`
  (from `jax.eval_shape`: nothing is allocated or compiled)."""
  shapes = _expected_shapes(variant, num_classes, tuple(sorted(model_kwargs.items())))
  return {m: dict(p) for m, p in shapes.items()}


# Per family, the block modules' name (the released code's).
_BLOCK_NAMES = {'NFNet': 'nf_block', 'NFResNet': 'nf_res_block', 'NFRegNet': 'nf_block'}


def _default_width(family: str) -> float:
  """The family's default width multiplier (1, 4, 0.75), from its constructor."""
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  return inspect.signature(models.MODEL_FAMILIES[family]).parameters['width'].default


def _family_of_params(params: Mapping) -> Optional[str]:
  """The family whose root module the tree's modules live under, or None."""
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  roots = {m.split('/~/')[0] for m in params}
  for family, root in models.ROOT_MODULES.items():
    if root in roots:
      return family
  return None


def _block_layout(params: Mapping,
                  family: Optional[str] = None) -> Optional[tuple[list[int], list[int]]]:
  """(stage depths, stage widths) read off a parameter tree, or None."""
  family = family or _family_of_params(params) or 'NFNet'
  pattern = re.compile(
      r'^(?P<prefix>.+)/~/' + _BLOCK_NAMES[family] + r'(?:_(?P<index>\d+))?$')
  blocks = {}
  for module in params:
    match = pattern.match(module)
    if match:
      blocks[int(match.group('index') or 0)] = module
  if not blocks or sorted(blocks) != list(range(len(blocks))):
    return None
  starts, widths = [], []
  for i in range(len(blocks)):
    module = blocks[i]
    if i == 0 or f'{module}/~/conv_shortcut' in params:  # a stage's first block
      conv2 = params.get(f'{module}/~/conv2', {}).get('w')
      if conv2 is None or np.ndim(conv2) != 4:
        return None
      starts.append(i)
      widths.append(int(np.shape(conv2)[-1]))
  depths = [b - a for a, b in zip(starts, starts[1:] + [len(blocks)])]
  return depths, widths


def guess_variant(params: Mapping, width: Optional[float] = None) -> Optional[str]:
  """The variant whose stage depths and widths the parameter tree has, or None.

  The family comes from the root module (`NFNet`, `NF_ResNet`, `NF_RegNet`); stage
  boundaries are the blocks with a `conv_shortcut`; a stage's width is its first
  block's `conv2` output channels. `width` is the multiplier the file was made with
  (default: the family's, 1.0 / 4 / 0.75)."""
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  family = _family_of_params(params)
  if family is None:
    return None
  layout = _block_layout(params, family)
  if layout is None:
    return None
  depths, widths = layout
  width = _default_width(family) if width is None else width
  table = models.FAMILY_VARIANTS[family]
  for name, cfg in table.items():
    if list(cfg['depth']) == depths and [int(w * width) for w in cfg['width']] == widths:
      return name
  for name, cfg in table.items():  # right depths, another width multiplier
    if list(cfg['depth']) == depths and len(widths) == len(cfg['width']):
      ratios = [w / c for w, c in zip(widths, cfg['width'])]
      if max(ratios) <= 1.05 * min(ratios):
        return name
  return None


def _natural_key(path: str) -> list:
  """Sorts 'nf_block_2' before 'nf_block_10'."""
  return [(0, int(t), '') if t.isdigit() else (1, 0, t) for t in re.split(r'(\d+)', path)]


def _fmt_shape(shape) -> str:
  return str(tuple(int(d) for d in shape))


def check_params(params: Mapping, variant: str = 'F0', num_classes: int = 1000,
                 **model_kwargs) -> None:
  """Checks a parameter tree against `Family(num_classes, variant, **model_kwargs)`,
  the family (NFNet, NFResNet, NFRegNet) being the one `variant` belongs to.

  Every module path and parameter name must be present, none extra, every shape equal
  and every dtype floating. Raises ParamsMismatchError naming each offending parameter
  path with the expected and the found shape, and suggesting the likely fix (the
  variant or num_classes the file's shapes match, an OIHW layout, a renamed root).
  """
  if not isinstance(params, Mapping) or not all(
      isinstance(v, Mapping) for v in params.values()):
    raise ParamsMismatchError(
        'expected a Haiku parameter dict {module path: {param name: array}}, got '
        f'{type(params).__name__}')
  expected = expected_param_shapes(variant, num_classes, **model_kwargs)
  problems, hints = [], []
  missing_modules = sorted((m for m in expected if m not in params), key=_natural_key)
  extra_modules = sorted((m for m in params if m not in expected), key=_natural_key)
  transposed = False
  for module in sorted(expected, key=_natural_key):
    if module not in params:
      continue
    shapes, found = expected[module], params[module]
    for name, shape in shapes.items():
      where = f'{module}/{name}'
      if name not in found:
        problems.append(f'missing parameter {where} (expected shape {_fmt_shape(shape)})')
        continue
      value = found[name]
      got = tuple(np.shape(value))
      if got != shape:
        problems.append(f'{where}: expected shape {_fmt_shape(shape)}, found '
                        f'{_fmt_shape(got)}')
        if len(shape) == 4 and got == (shape[3], shape[2], shape[0], shape[1]):
          transposed = True
      elif not np.issubdtype(np.asarray(value).dtype, np.floating):
        problems.append(f'{where}: expected a floating-point array, found dtype '
                        f'{np.asarray(value).dtype}')
    for name in found:
      if name not in shapes:
        problems.append(f'unexpected parameter {module}/{name} (shape '
                        f'{_fmt_shape(np.shape(found[name]))})')
  for label, modules in (('unexpected', extra_modules), ('missing', missing_modules)):
    if modules:
      listed = ', '.join(modules[:6]) + (', ...' if len(modules) > 6 else '')
      problems.insert(0, f'{len(modules)} {label} module(s): {listed}')
  if not problems:
    return

  family = family_of(variant)
  kw = ''.join(f', {k}={v!r}' for k, v in sorted(model_kwargs.items()))
  guess = guess_variant(params, model_kwargs.get('width'))
  if guess is not None and guess != variant:
    layout = _block_layout(params)
    hints.append(f'the file\'s shapes match variant {guess!r} (stage depths {layout[0]}, '
                 f'stage widths {layout[1]}): pass variant={guess!r}')
  root = _root(family, model_kwargs)
  linear = params.get(f'{root}/~/linear', {}).get('w')
  if linear is not None and np.ndim(linear) == 2 and np.shape(linear)[1] != num_classes:
    hints.append(f'the classifier has {np.shape(linear)[1]} outputs: pass '
                 f'num_classes={np.shape(linear)[1]}')
  if transposed:
    hints.append('some conv weights look OIHW (PyTorch layout): Haiku wants HWIO, '
                 'i.e. w.transpose(2, 3, 1, 0)')
  roots = {m.split('/~/')[0] for m in params}
  if extra_modules and missing_modules and roots and root not in roots:
    hints.append(f'the file\'s modules live under {sorted(roots)!r}, the model\'s under '
                 f'{root!r}: rename them or pass name=')
  if not hints:
    hints.append('check the variant and the model arguments (width, group_size, '
                 'final_conv_mult, use_two_convs, ...) the file was trained with')
  shown = problems[:12]
  more = f'\n  ... and {len(problems) - len(shown)} more' if len(problems) > len(shown) else ''
  raise ParamsMismatchError(
      f'parameters do not match {family}(num_classes={num_classes}, variant={variant!r}{kw}).'
      '\nLikely fix: ' + '; '.join(hints) + f'.\n{len(problems)} problem(s):\n  - '
      + '\n  - '.join(shown) + more)


# ---------------------------------------------------------------------------
# Our pickle-free format, and the public entry points.


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
  """{'NFNet/~/stem_conv0//w': array, ...}: one flat key per parameter."""
  flat = {}
  for module, group in params.items():
    if SEPARATOR in module or module.startswith('__'):
      raise ValueError(f'module path {module!r} cannot be stored: it contains '
                       f'{SEPARATOR!r} or starts with "__"')
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


def _load_converted(path: str) -> tuple[dict, Optional[str]]:
  try:
    # Open it ourselves: np.load leaks its own handle when the zip is unreadable.
    with open(path, 'rb') as f, np.load(f, allow_pickle=False) as archive:
      files = set(archive.files)
      if FORMAT_KEY not in files or str(archive[FORMAT_KEY]) != CONVERTED_FORMAT:
        raise CorruptCheckpointError(
            f'{path} is a .npz archive but not one written by nfnet_jax.convert (no '
            f'{FORMAT_KEY!r} = {CONVERTED_FORMAT!r} entry)')
      variant = str(archive[VARIANT_KEY]) if VARIANT_KEY in files else None
      flat = {k: archive[k] for k in archive.files if SEPARATOR in k}
  except PretrainedError:
    raise
  except Exception as e:  # zipfile.BadZipFile, a truncated member, an object array...
    raise CorruptCheckpointError(
        f'{path} is not a readable converted .npz ({type(e).__name__}: {e}): it is '
        'truncated or corrupt; convert the released file again') from e
  return unflatten_params(flat), variant


def _load_any(path, variant: Optional[str], num_classes: Optional[int], verify_md5: bool,
              model_kwargs: dict) -> tuple[dict, str]:
  """Loads either format, resolves the variant, checks; returns (params, variant)."""
  path = os.fspath(path)
  with open(path, 'rb') as f:
    head = f.read(4)
  if head.startswith(_ZIP_MAGIC):
    params, stored = _load_converted(path)
    if variant is not None and stored is not None and stored != variant:
      raise ParamsMismatchError(
          f'{path} was converted for variant {stored!r}, but variant={variant!r} was '
          f'asked for: pass variant={stored!r}')
    variant = variant or stored
  else:
    params = load_released_params(path, variant, verify_md5=verify_md5)
    variant = variant or released_variant_from_name(path)
  if variant is None:
    variant = guess_variant(params, model_kwargs.get('width'))
    if variant is None:
      raise ParamsMismatchError(
          f'cannot tell which variant {path} holds (NFNet F0.., NF-ResNet ResNet50.. or '
          'NF-RegNet B0..): pass variant=')
  if num_classes is None:   # whatever the file's classifier has
    head = classifier_module(variant, **model_kwargs)
    bias = params.get(head, {}).get('b')
    if bias is None or np.ndim(bias) != 1:
      raise ParamsMismatchError(f'{path} has no classifier bias {head}/b.')
    num_classes = int(np.shape(bias)[0])
  check_params(params, variant, num_classes, **model_kwargs)
  params = {m: {n: np.asarray(v, dtype=np.float32, order='C') for n, v in group.items()}
            for m, group in params.items()}
  return params, variant


def load_pretrained(path, variant: Optional[str] = None, num_classes: Optional[int] = 1000, *,
                    verify_md5: bool = True,
                    **model_kwargs) -> dict[str, dict[str, np.ndarray]]:
  """Loads NFNet, NF-ResNet or NF-RegNet parameters, checked against the model, ready
  for `apply`.

  Accepts DeepMind's released `F{k}_haiku.npz` pickles (loaded with the restricted
  unpickler) and `.npz` files written by `convert` or exported by a training run.

  Args:
    path: the file.
    variant: 'F0'..'F7+', 'ResNet50'..'ResNet600' or 'B0'..'B8'; default: the
      converted file's metadata, else the released file name, else the variant the
      shapes match.
    num_classes: the classifier size to check against (1000 for the releases); None
      takes the file's.
    verify_md5: for released files, warn when the MD5 is not the listed one.
    **model_kwargs: further model arguments the parameters were made with (width,
      group_size, ...).

  Returns:
    {module path: {param name: float32 C-contiguous ndarray}}.
  """
  return _load_any(path, variant, num_classes, verify_md5, model_kwargs)[0]


def load_pretrained_with_variant(path, variant: Optional[str] = None,
                                 num_classes: Optional[int] = 1000,
                                 *, verify_md5: bool = True,
                                 **model_kwargs) -> tuple[dict, str]:
  """`load_pretrained`, also returning the variant it resolved (from the file when
  `variant` is None)."""
  return _load_any(path, variant, num_classes, verify_md5, model_kwargs)


def save_converted(params: Mapping, dst, variant: str, *, overwrite: bool = False) -> str:
  """Writes params as a pickle-free .npz, atomically (temporary file + rename).

  Refuses to replace an existing `dst` unless `overwrite`."""
  dst = os.fspath(dst)
  entries = flatten_params(params)
  entries[FORMAT_KEY] = np.array(CONVERTED_FORMAT)
  entries[VARIANT_KEY] = np.array(variant)
  if not overwrite and os.path.lexists(dst):
    raise FileExistsError(f'{dst} already exists; pass overwrite=True (--overwrite) to '
                          'replace it')
  directory = os.path.dirname(os.path.abspath(dst))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(dst)}.', suffix='.tmp',
                             dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, allow_pickle=False, **entries)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
    if overwrite:
      os.replace(tmp, dst)
    else:
      try:
        os.link(tmp, dst)  # atomic, and fails if dst appeared in the meantime
      except FileExistsError:
        raise FileExistsError(f'{dst} already exists; pass overwrite=True (--overwrite) '
                              'to replace it') from None
      except OSError:  # no hard links on this filesystem
        if os.path.lexists(dst):
          raise FileExistsError(f'{dst} already exists') from None
        os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return dst


def convert(src, dst, variant: Optional[str] = None, *, overwrite: bool = False,
            num_classes: int = 1000, verify_md5: bool = True, **model_kwargs) -> dict:
  """Loads `src` (released pickle or converted .npz), checks it, writes `dst`.

  Returns a summary: variant, number of parameter arrays and values, dst, its MD5."""
  params, variant = _load_any(src, variant, num_classes, verify_md5, model_kwargs)
  save_converted(params, dst, variant, overwrite=overwrite)
  return dict(variant=variant, dst=os.fspath(dst),
              arrays=sum(len(g) for g in params.values()),
              values=int(sum(v.size for g in params.values() for v in g.values())),
              md5=file_md5(dst))


__all__ = [
    'ADMITTED_GLOBALS', 'RELEASED_MD5', 'RELEASED_SIZES', 'SEPARATOR',
    'PretrainedError', 'UnsafePickleError', 'CorruptCheckpointError',
    'ParamsMismatchError', 'UnverifiedChecksumWarning', 'SafeUnpickler',
    'load_released_params', 'load_pretrained', 'check_params', 'expected_param_shapes',
    'classifier_module', 'family_of',
    'guess_variant', 'flatten_params', 'unflatten_params', 'save_converted', 'convert',
    'file_md5', 'released_variant_from_name',
]
