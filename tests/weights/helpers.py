"""What the weights tests share: writing released-format streams, and parameter trees.

DeepMind's released NFNet weights (deepmind-research/nfnets, `F{k}_haiku.npz`) are dill
pickles (protocol 3) of a Haiku FlatMapping. The tests write such streams themselves: a
pure-Python Pickler that emits `GLOBAL module name` for placeholder objects, so the
streams reference `haiku._src.data_structures.FlatMapping`, dill's helpers and numpy's
`_reconstruct` exactly as the released files do, without importing (or faking in
sys.modules) haiku's or dill's modules.
"""

import io
import pickle
import pickletools
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np

from nfnet_jax import weights

NARROW = dict(width=0.0625, group_size=8)  # F-variant shapes at ~1/16 width.
NUM_CLASSES = 10


# ---------------------------------------------------------------------------
# Writing released-format streams.


class Glob:
  """A global the stream names (`GLOBAL module name`); never imported or resolved."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # save_reduce insists on a callable
    raise AssertionError('placeholder only')


class Call:
  """Pickles as REDUCE(func, args): `func(*args)` at load time."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __call__(self, *args):
    raise AssertionError('placeholder only')


class FlatMapping:
  """Pickles as haiku's `FlatMapping(dict)`."""

  def __init__(self, mapping):
    self.mapping = mapping


class SharedState:
  """Pickles as an ndarray whose BUILD state is the given tuple (version, shape, dtype,
  fortran, raw bytes) as is: instances given one tuple share it through the memo (a
  writer never does that; a crafted stream can)."""

  def __init__(self, state):
    self.state = state


FLATMAPPING = Glob('haiku._src.data_structures', 'FlatMapping')
IMPORT_MODULE = Glob('dill._dill', '_import_module')
GET_ATTR = Glob('dill._dill', '_get_attr')
# How each writer references numpy's _reconstruct.
RECONSTRUCT = {
  'pickle_numpy1': Glob('numpy.core.multiarray', '_reconstruct'),
  'pickle_numpy2': Glob('numpy._core.multiarray', '_reconstruct'),
  # dill saves the builtin indirectly: _get_attr(_import_module(<C module>), name).
  'dill_numpy1': Call(
    GET_ATTR, Call(IMPORT_MODULE, 'numpy.core._multiarray_umath'), '_reconstruct'
  ),
  'dill_numpy2': Call(
    GET_ATTR, Call(IMPORT_MODULE, 'numpy._core._multiarray_umath'), '_reconstruct'
  ),
}


class StreamWriter(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python Pickler (which dill subclasses) plus placeholder globals."""

  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def __init__(self, f, reconstruct, int_dtype_flags=False, protocol=3):
    super().__init__(f, protocol=protocol)
    self.reconstruct = reconstruct
    self.int_dtype_flags = int_dtype_flags

  def reducer_override(self, obj):
    # numpy 1.x (which wrote the releases) reduced dtypes to dtype('f4', 0, 1); numpy 2
    # writes dtype('f4', False, True).
    if self.int_dtype_flags and isinstance(obj, np.dtype):
      func, (spec, align, copy), state = obj.__reduce__()
      return func, (spec, int(align), int(copy)), state
    return NotImplemented

  def save_glob(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('utf-8'))
    self.memoize(obj)

  def save_call(self, obj):
    self.save_reduce(obj.func, obj.args, obj=obj)

  def save_flat_mapping(self, obj):
    self.save_reduce(FLATMAPPING, (obj.mapping,), obj=obj)

  def save_ndarray(self, obj):
    _, args, state = obj.__reduce__()  # (_reconstruct, (ndarray, (0,), b'b'), state)
    self.save_reduce(self.reconstruct, args, state, obj=obj)

  def save_shared_state(self, obj):
    args = np.zeros(0, np.float32).__reduce__()[1]  # (ndarray, (0,), b'b')
    self.save_reduce(self.reconstruct, args, obj.state, obj=obj)

  dispatch[Glob] = save_glob
  dispatch[Call] = save_call
  dispatch[FlatMapping] = save_flat_mapping
  dispatch[np.ndarray] = save_ndarray
  dispatch[SharedState] = save_shared_state


def released_bytes(tree, style='dill_numpy1'):
  """Bytes of `tree` in the released layout: FlatMapping of FlatMappings of arrays."""
  wrapped = FlatMapping({m: FlatMapping(dict(p)) for m, p in tree.items()})
  buf = io.BytesIO()
  StreamWriter(buf, RECONSTRUCT[style], style.endswith('numpy1')).dump(wrapped)
  return buf.getvalue()


def payload_bytes(obj, style='dill_numpy1'):
  """A released-format file whose classifier weight is `obj` (a hostile payload)."""
  return released_bytes(
    {'NFNet/~/stem_conv0': {'w': np.ones(3, np.float32)}, 'NFNet/~/linear': {'w': obj}}, style
  )


def globals_in(data):
  return [arg for op, arg, _ in pickletools.genops(data) if op.name == 'GLOBAL']


def write(path, data):
  path.write_bytes(data)
  return path


# ---------------------------------------------------------------------------
# Parameter trees.


def small_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'NFNet/~/stem_conv0': {
      'w': rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
      'gain': np.ones(4, np.float32),
      'bias': np.zeros(4, np.float32),
    },
    'NFNet/~/nf_block': {'skip_gain': np.array(0.25, np.float32)},
    'NFNet/~/linear': {
      'w': np.asfortranarray(rng.standard_normal((4, 3)).astype(np.float32)),
      'b': rng.standard_normal(3).astype(np.float32),
    },
  }


def model_tree(variant='F0', seed=0, num_classes=NUM_CLASSES, **kwargs):
  kwargs = kwargs or NARROW
  rng = np.random.default_rng(seed)
  shapes = weights.expected_param_shapes(variant, num_classes, **kwargs)
  return {
    m: {n: rng.standard_normal(s).astype(np.float32) for n, s in p.items()}
    for m, p in shapes.items()
  }


def shape_only_tree(variant, num_classes=1000, **kwargs):
  """Full-size trees without the memory: zero-stride broadcast views."""
  shapes = weights.expected_param_shapes(variant, num_classes, **kwargs)
  return {
    m: {n: np.broadcast_to(np.float32(0), s) for n, s in p.items()} for m, p in shapes.items()
  }


def assert_trees_equal(a, b):
  assert sorted(a) == sorted(b)
  for m in a:
    assert sorted(a[m]) == sorted(b[m]), m
    for n in a[m]:
      assert b[m][n].dtype == np.float32 and b[m][n].shape == a[m][n].shape, (m, n)
      np.testing.assert_array_equal(b[m][n], a[m][n])


# ---------------------------------------------------------------------------
# Hand-made .npz archives: honest members, or headers declaring huge runs of zeros.


def npy_bytes(array) -> bytes:
  """An .npy file's bytes (what np.savez puts in each member)."""
  buf = io.BytesIO()
  np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
  return buf.getvalue()


def npy_header(shape, descr='<f4', fortran_order=False, version=(1, 0)) -> bytes:
  """An .npy header declaring anything (numpy writes what it is given, unchecked)."""
  buf = io.BytesIO()
  write = {
    (1, 0): np.lib.format.write_array_header_1_0,
    (2, 0): np.lib.format.write_array_header_2_0,
  }[version]
  write(buf, {'descr': descr, 'fortran_order': fortran_order, 'shape': tuple(shape)})
  return buf.getvalue()


_ZEROS = bytes(1 << 20)


def _deflate(prefix: bytes, zeros: int) -> tuple[bytes, int]:
  """(raw deflate stream, CRC-32) of `prefix` then `zeros` zero bytes, without making
  the zeros: after a full flush the compressor starts afresh, so every MiB of zeros
  deflates to the same block, computed once and repeated."""
  co = zlib.compressobj(9, zlib.DEFLATED, -15)
  out = [co.compress(prefix), co.flush(zlib.Z_FULL_FLUSH)]
  crc = zlib.crc32(prefix)
  whole, rest = divmod(zeros, len(_ZEROS))
  if whole:
    out.append((co.compress(_ZEROS) + co.flush(zlib.Z_FULL_FLUSH)) * whole)
    for _ in range(whole):
      crc = zlib.crc32(_ZEROS, crc)
  out += [co.compress(bytes(rest)), co.flush()]
  return b''.join(out), zlib.crc32(bytes(rest), crc)


def write_deflated_npz(path, members):
  """Writes a deflated zip (what np.savez_compressed writes) by hand: `members` maps
  each member name to its bytes, or to (prefix, n) for `prefix` followed by n zero
  bytes: a header can declare gigabytes that the file holds in a few KiB, with sizes
  and CRCs as honest as np.savez_compressed's. Names may repeat (zipfile refuses to
  write that). Returns `path`."""
  body, central, count = bytearray(), bytearray(), 0
  for name, content in members if isinstance(members, list) else members.items():
    prefix, zeros = (content, 0) if isinstance(content, bytes) else content
    data, crc = _deflate(prefix, zeros)
    size = len(prefix) + zeros
    assert size < 1 << 32 and len(data) < 1 << 32, 'no zip64 here'
    encoded, offset = name.encode('utf-8'), len(body)
    fields = (zipfile.ZIP_DEFLATED, 0, 0x21, crc, len(data), size, len(encoded))  # date: 1980
    body += struct.pack(zipfile.structFileHeader, zipfile.stringFileHeader, 20, 0, 0, *fields, 0)
    body += encoded + data
    central += struct.pack(
      zipfile.structCentralDir, zipfile.stringCentralDir, 20, 0, 20, 0, 0, *fields,
      0, 0, 0, 0, 0, offset,
    )  # fmt: skip
    central += encoded
    count += 1
  end = struct.pack(
    zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, count, count, len(central),
    len(body), 0,
  )  # fmt: skip
  path.write_bytes(bytes(body + central + end))
  return path


def converted_members(tree, variant='F0'):
  """{member name: .npy bytes} of `tree` as save_converted lays it out."""
  members = {f'{k}.npy': npy_bytes(v) for k, v in weights.flatten_params(tree).items()}
  members['__format__.npy'] = npy_bytes(np.array('nfnet_jax.params.v1'))
  if variant is not None:
    members['__variant__.npy'] = npy_bytes(np.array(variant))
  return members


def traced_peak(fn) -> int:
  """The peak of Python's and NumPy's traced allocations (bytes) while `fn()` runs:
  NumPy reports its array buffers to tracemalloc, so an array the loader allocates
  counts, touched or not."""
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
