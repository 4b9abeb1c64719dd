"""nfnet_jax.weights.released: DeepMind's released `F{k}_haiku.npz` pickles
(deepmind-research/nfnets), read by a restricted unpickler that runs nothing from them.
"""

import hashlib
import io
import pickle
import pickletools
import re
import sys
import warnings

import numpy as np
import pytest

from nfnet_jax import weights
from nfnet_jax.weights import (
  CorruptCheckpointError,
  ParamsMismatchError,
  UnsafePickleError,
  UnverifiedChecksumWarning,
  released,
)
from tests.weights.helpers import (
  FLATMAPPING,
  GET_ATTR,
  IMPORT_MODULE,
  NARROW,
  NUM_CLASSES,
  RECONSTRUCT,
  Call,
  FlatMapping,
  Glob,
  SharedState,
  StreamWriter,
  assert_trees_equal,
  globals_in,
  model_tree,
  payload_bytes,
  released_bytes,
  shape_only_tree,
  small_tree,
  traced_peak,
  write,
)


def load_quiet(path, **kwargs):
  kwargs.setdefault('verify_md5', False)
  return weights.load_released_params(path, **kwargs)


def test_released_module_needs_no_model_haiku_or_jax():
  """The unpickler is NumPy and the standard library: check its own imports."""
  import ast  # pylint: disable=g-import-not-at-top

  with open(released.__file__, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  imported = {
    alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
  }
  imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  assert imported <= {
    'hashlib',
    'os',
    'pickle',
    'pickletools',
    're',
    'reprlib',
    'warnings',
    'typing',
    'numpy',
    'nfnet_jax.weights.errors',
  }, imported


# ---------------------------------------------------------------------------
# The released format loads.


@pytest.mark.parametrize('style', sorted(RECONSTRUCT))
def test_released_format_loads(tmp_path, style):
  tree = small_tree()
  data = released_bytes(tree, style)
  assert data[:2] == b'\x80\x03'
  names = globals_in(data)
  assert 'haiku._src.data_structures FlatMapping' in names
  assert {'numpy ndarray', 'numpy dtype'} <= set(names)
  if style.startswith('dill'):
    # dill's indirect path, written once and memoized, like dill's stream.
    assert names.count('dill._dill _get_attr') == 1
    assert names.count('dill._dill _import_module') == 1
    assert not any(n.endswith(' _reconstruct') for n in names)
  else:
    assert any(n.endswith('multiarray _reconstruct') for n in names)
  haiku_ds = sys.modules.get('haiku._src.data_structures')
  out = load_quiet(write(tmp_path / 'params.pkl', data))
  assert type(out) is dict  # pylint: disable=unidiomatic-typecheck
  assert all(type(v) is dict for v in out.values())  # pylint: disable=unidiomatic-typecheck
  assert_trees_equal(tree, out)
  assert out['NFNet/~/nf_block']['skip_gain'].shape == ()
  assert all(v.flags.writeable and v.flags.c_contiguous for p in out.values() for v in p.values())
  # Nothing was imported or faked to load it.
  assert sys.modules.get('haiku._src.data_structures') is haiku_ds
  assert 'dill' not in sys.modules and 'dill._dill' not in sys.modules


def test_fixture_matches_the_released_f0_size():
  """The dill-style stream of the full F0 tree (numpy 1.x dtype flags) is exactly the
  released file's 285,976,842 bytes: the fixtures have the released layout."""

  class CountingSink:
    size = 0

    def write(self, data):
      self.size += len(data)

  tree = shape_only_tree('F0')
  sink = CountingSink()
  wrapped = FlatMapping({m: FlatMapping(dict(p)) for m, p in tree.items()})
  StreamWriter(sink, RECONSTRUCT['dill_numpy1'], int_dtype_flags=True).dump(wrapped)
  assert sink.size == weights.RELEASED_SIZES['F0'] == 285_976_842


@pytest.mark.parametrize('protocol', [3, 4])
def test_plain_pickle_of_a_dict_tree_loads(tmp_path, protocol):
  tree = small_tree(1)
  tree['NFNet/~/linear']['b'] = tree['NFNet/~/linear']['b'].astype('>f4')  # big-endian
  out = load_quiet(write(tmp_path / 'p.pkl', pickle.dumps(tree, protocol=protocol)))
  assert_trees_equal(tree, out)
  assert out['NFNet/~/linear']['b'].dtype.isnative


# ---------------------------------------------------------------------------
# Hostile pickles: refused, naming the offender, with nothing run.


def hostile_payloads(marker):
  cmd = f'touch {marker}'
  return {
    'os.system': (Call(Glob('os', 'system'), cmd), 'os.system'),
    'posix.system': (Call(Glob('posix', 'system'), cmd), 'posix.system'),
    'builtins.eval': (
      Call(Glob('builtins', 'eval'), f'open({str(marker)!r}, "w")'),
      'builtins.eval',
    ),
    'builtins.getattr': (Call(Glob('builtins', 'getattr'), 1, 'real'), 'builtins.getattr'),
    'dill_os_system': (
      Call(Call(GET_ATTR, Call(IMPORT_MODULE, 'os'), 'system'), cmd),
      "_import_module('os')",
    ),
    'dill_subprocess': (Call(IMPORT_MODULE, 'subprocess'), "'subprocess'"),
    'dill_numpy_other_attr': (
      Call(Call(GET_ATTR, Call(IMPORT_MODULE, 'numpy.core._multiarray_umath'), 'scalar'), 1),
      "'scalar'",
    ),
    'dill_get_attr_on_string': (Call(GET_ATTR, 'os', '_reconstruct'), '_get_attr'),
    'numpy.load': (Call(Glob('numpy', 'load'), str(marker)), 'numpy.load'),
    'numpy.testing': (
      Call(Glob('numpy.testing._private.utils', 'runstring'), f'open({str(marker)!r}, "w")', {}),
      'numpy.testing._private.utils.runstring',
    ),
    'numpy.core.multiarray.scalar': (
      Call(Glob('numpy.core.multiarray', 'scalar'), 1),
      'numpy.core.multiarray.scalar',
    ),
    'ndarray_called': (Call(Glob('numpy', 'ndarray'), (10**12,)), 'numpy.ndarray'),
    'reconstruct_wrong_args': (
      Call(RECONSTRUCT['pickle_numpy2'], Glob('numpy', 'dtype'), (0,), b'b'),
      '_reconstruct',
    ),
    'object_dtype': (Call(Glob('numpy', 'dtype'), 'O', False, True), "numpy.dtype('O'"),
    'flatmapping_of_list': (Call(FLATMAPPING, [('a', 1)]), 'FlatMapping'),
    'codecs_protocol2': (Call(Glob('_codecs', 'encode'), 'x', 'latin1'), '_codecs.encode'),
  }


@pytest.mark.parametrize('name', sorted(hostile_payloads('m')))
def test_hostile_pickles_are_refused(tmp_path, name):
  marker = tmp_path / 'pwned'
  payload, offender = hostile_payloads(marker)[name]
  data = payload_bytes(payload)
  path = write(tmp_path / 'F0_haiku.npz', data)
  with pytest.raises(UnsafePickleError) as err:
    load_quiet(path)
  assert offender in str(err.value)
  # The unpickler alone (no static scan in front of it) refuses it too.
  with pytest.raises(UnsafePickleError) as err:
    weights.SafeUnpickler(io.BytesIO(data)).load()
  assert offender in str(err.value)
  # And so does everything built on the loader.
  with pytest.raises(UnsafePickleError):
    weights.load_pretrained(path, 'F0', verify_md5=False)
  assert not marker.exists()


def _unicode(text):
  data = text.encode('utf-8')
  if len(data) < 256:
    return b'\x8c' + bytes([len(data)]) + data  # SHORT_BINUNICODE
  return b'X' + len(data).to_bytes(4, 'little') + data  # BINUNICODE


def _call_global_payloads(marker):
  """`os.system('touch marker')` named both ways a pickle can name a global."""
  cmd = _unicode(f'touch {marker}')
  return {
    'GLOBAL': b'\x80\x03cos\nsystem\n' + cmd + b'\x85R.',
    'STACK_GLOBAL': b'\x80\x04' + _unicode('os') + _unicode('system') + b'\x93' + cmd + b'\x85R.',
  }


@pytest.mark.parametrize('opcode', ['GLOBAL', 'STACK_GLOBAL'])
def test_globals_are_admitted_in_one_place(tmp_path, monkeypatch, opcode):
  """GLOBAL and STACK_GLOBAL both reach `SafeUnpickler.find_class`, which refuses
  os.system before anything runs; the static scan does not judge globals itself."""
  marker = tmp_path / 'pwned'
  data = _call_global_payloads(marker)[opcode]
  assert any(op.name == opcode for op, _, _ in pickletools.genops(data))
  path = write(tmp_path / 'x.pkl', data)
  # The scan reads the whole stream (and returns its MD5) without refusing the global.
  scan = released._scan_pickle  # pylint: disable=protected-access
  with open(path, 'rb') as f:
    assert scan(f, len(data), str(path)) == hashlib.md5(data).hexdigest()
  asked = []
  find_class = released.SafeUnpickler.find_class

  def spy(self, module, name):
    asked.append((module, name))
    return find_class(self, module, name)

  monkeypatch.setattr(released.SafeUnpickler, 'find_class', spy)
  with pytest.raises(UnsafePickleError, match=r'global os\.system') as err:
    load_quiet(path)
  assert 'admitted:' in str(err.value)
  assert asked == [('os', 'system')]
  with pytest.raises(UnsafePickleError, match=r'global os\.system'):
    weights.SafeUnpickler(io.BytesIO(data)).load()
  assert not marker.exists()


@pytest.mark.parametrize(
  'data,opcode,offender',
  [
    (b'\x80\x03(X\x01\x00\x00\x00xios\nsystem\n.', 'INST', 'os.system'),
    (b'\x80\x03(cnumpy\ndtype\nX\x01\x00\x00\x00Oo.', 'OBJ', "numpy.dtype\\('O'"),
    (b'\x80\x03cnumpy\ndtype\n)\x81.', 'NEWOBJ', None),
    (b'\x80\x03X\x01\x00\x00\x00xQ.', 'BINPERSID', 'persistent id'),
    (b'\x80\x03\x82\x01.', 'EXT1', None),
  ],
)
def test_opcodes_that_call_things_are_refused(tmp_path, data, opcode, offender):
  with pytest.raises(UnsafePickleError, match=opcode):
    load_quiet(write(tmp_path / 'x.pkl', data))
  if offender:
    with pytest.raises(UnsafePickleError, match=offender):
      weights.SafeUnpickler(io.BytesIO(data)).load()


def test_build_cannot_modify_the_stand_ins(tmp_path):
  # GLOBAL numpy dtype; {'_fn': ...}; BUILD -- would rebind the stand-in's function.
  data = b'\x80\x03cnumpy\ndtype\n}X\x03\x00\x00\x00_fnX\x01\x00\x00\x00xsb.'
  with pytest.raises(UnsafePickleError, match='set state'):
    load_quiet(write(tmp_path / 'x.pkl', data))
  assert weights.ADMITTED_GLOBALS[('numpy', 'dtype')]('f4').dtype == np.float32


def test_dtype_stand_in_takes_numpy1_and_numpy2_flags_only():
  make_dtype = weights.ADMITTED_GLOBALS[('numpy', 'dtype')]
  assert make_dtype('f4', 0, 1).dtype == make_dtype('f4', False, True).dtype == np.float32
  for args in [
    ('f4', 2, 1),
    ('f4', 0.0, 1),
    ('V8', 0, 1),
    ('O8', 0, 1),
    ('U4', 0, 1),
    (b'f4', 0, 1),
  ]:
    with pytest.raises(UnsafePickleError, match='numpy.dtype'):
      make_dtype(*args)


def test_refusal_messages_stay_short(tmp_path):
  huge = Call(IMPORT_MODULE, 'x' * 10_000_000)
  with pytest.raises(UnsafePickleError) as err:
    load_quiet(write(tmp_path / 'x.pkl', payload_bytes(huge)))
  assert len(str(err.value)) < 1000 and "'xxxx" in str(err.value)


def test_admitted_globals_are_exactly_the_released_ones():
  assert set(weights.ADMITTED_GLOBALS) == {
    ('haiku._src.data_structures', 'FlatMapping'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('dill._dill', '_import_module'),
    ('dill._dill', '_get_attr'),
  }
  # None of them is a real numpy/haiku/dill object.
  for value in weights.ADMITTED_GLOBALS.values():
    assert type(value).__module__ == 'nfnet_jax.weights.released'


# ---------------------------------------------------------------------------
# Broken files.


def test_truncated_released_file(tmp_path):
  data = released_bytes(small_tree())
  path = write(tmp_path / 'F0_haiku.npz', data[: len(data) // 2])
  with pytest.raises(CorruptCheckpointError) as err:
    weights.load_released_params(path)
  msg = str(err.value)
  assert 'truncated or corrupt' in msg and 'Re-download' in msg
  assert '285,976,842' in msg
  # Without the released name there is no size to quote, but the rest holds.
  other = write(tmp_path / 'mine.pkl', data[:-1])  # just the STOP missing
  with pytest.raises(CorruptCheckpointError, match='truncated or corrupt'):
    weights.load_released_params(other)


def test_empty_and_non_pickle_files(tmp_path):
  with pytest.raises(CorruptCheckpointError, match='empty.*285,976,842.*Re-download'):
    weights.load_released_params(write(tmp_path / 'F0_haiku.npz', b''))
  with pytest.raises(CorruptCheckpointError, match='not a pickle'):
    weights.load_released_params(write(tmp_path / 'a.npz', b'<html>404 Not Found</html>'))
  with pytest.raises(CorruptCheckpointError, match='not a pickle'):
    weights.load_pretrained(write(tmp_path / 'b.npz', b'hello world\n'))
  with pytest.raises(CorruptCheckpointError, match='after the pickle ends'):
    weights.load_released_params(
      write(tmp_path / 'c.pkl', released_bytes(small_tree()) + b'junk'), verify_md5=False
    )
  # A stream claiming a 4 GiB bytes object in a tiny file: corrupt, no huge allocation.
  with pytest.raises(CorruptCheckpointError, match='truncated or corrupt'):
    weights.load_released_params(write(tmp_path / 'd.pkl', b'\x80\x03B\xff\xff\xff\xffab'))
  # A pickle of something that is not a parameter tree.
  with pytest.raises(CorruptCheckpointError, match='not a Haiku parameter dict'):
    load_quiet(write(tmp_path / 'e.pkl', pickle.dumps([1, 2], protocol=3)))
  # A real zip .npz given to the pickle loader is pointed at load_pretrained.
  np.savez(tmp_path / 'f.npz', a=np.ones(2))
  with pytest.raises(CorruptCheckpointError, match='load_pretrained'):
    weights.load_released_params(tmp_path / 'f.npz')


def test_array_with_wrong_byte_count_is_corrupt(tmp_path):
  data = released_bytes({'m': {'w': np.arange(4, dtype=np.float32)}})
  i = data.index(b'C\x10')  # SHORT_BINBYTES of 16 bytes: the array's data
  data = data[:i] + b'C\x0c' + data[i + 2 : i + 14] + data[i + 18 :]  # keep 12 of 16
  with pytest.raises(CorruptCheckpointError, match='should hold 16 bytes'):
    load_quiet(write(tmp_path / 'x.pkl', data))


# ---------------------------------------------------------------------------
# Checksums.


def test_md5_mismatch_warns_but_loads(tmp_path, monkeypatch):
  tree = small_tree()
  path = write(tmp_path / 'F0_haiku.npz', released_bytes(tree))
  with pytest.warns(UnverifiedChecksumWarning) as record:
    out = weights.load_released_params(path)
  assert_trees_equal(tree, out)
  msg = str(record[0].message)
  assert 'CHECKSUM MISMATCH' in msg and 'unverified' in msg
  assert weights.RELEASED_MD5['F0'] in msg and '285,976,842' in msg
  # The explicit variant picks the entry, whatever the name.
  other = write(tmp_path / 'weights.bin', released_bytes(tree))
  with pytest.warns(UnverifiedChecksumWarning, match=weights.RELEASED_MD5['F3']):
    weights.load_released_params(other, variant='F3')
  # A matching MD5 is silent.
  md5 = hashlib.md5(path.read_bytes()).hexdigest()
  assert weights.file_md5(path) == md5
  monkeypatch.setitem(weights.RELEASED_MD5, 'F0', md5)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    weights.load_released_params(path)


def test_refused_file_gets_no_checksum_warning(tmp_path):
  """A hostile file is refused before its MD5 is compared: one error, no warning."""
  path = write(tmp_path / 'F0_haiku.npz', payload_bytes(Call(Glob('os', 'system'), 'true')))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    with pytest.raises(UnsafePickleError, match='os.system'):
      weights.load_released_params(path)


def test_released_variant_from_name():
  assert weights.released_variant_from_name('/x/F3_haiku.npz') == 'F3'
  assert weights.released_variant_from_name('F0_haiku.npz') == 'F0'
  assert weights.released_variant_from_name('/x/NF-F3_haiku.npz') == 'F3'
  assert weights.released_variant_from_name('/x/XF3_haiku.npz') is None
  assert weights.released_variant_from_name('/F3_haiku/params.npz') is None


# ---------------------------------------------------------------------------
# Memory: what a file declares is checked before arrays are built.


def shared_state_bytes(state, count, style='pickle_numpy2'):
  """A released-format stream of `count` arrays all given the one state tuple."""
  tree = FlatMapping(
    {'NFNet/~/linear': FlatMapping({f'w{i}': SharedState(state) for i in range(count)})}
  )
  buf = io.BytesIO()
  StreamWriter(buf, RECONSTRUCT[style]).dump(tree)
  return buf.getvalue()


def test_arrays_sharing_their_bytes_are_refused_before_building(tmp_path):
  """The memo lets 128 arrays share one 4 MiB bytes object: each would be built as its
  own copy (512 MiB from a 4 MiB file). Refused before any is built."""
  raw = bytes(4 << 20)
  data = shared_state_bytes((1, (1 << 20,), np.dtype('f4'), False, raw), 128)
  assert len(data) < 5 << 20
  assert [op.name for op, _, _ in pickletools.genops(data)].count('BINGET') >= 127
  path = write(tmp_path / 'shared.pkl', data)

  def load():
    with pytest.raises(CorruptCheckpointError) as err:
      load_quiet(path)
    msg = str(err.value)
    assert msg.startswith(f'{path} ({len(data):,} bytes) declares 128 arrays of 536,870,912')
    assert 'more than the file holds' in msg

  assert traced_peak(load) < 200 << 20
  # One array given a file's worth of bytes is what a writer makes: it loads.
  one = write(
    tmp_path / 'one.pkl', shared_state_bytes((1, (1 << 20,), np.dtype('f4'), False, raw), 1)
  )
  assert load_quiet(one)['NFNet/~/linear']['w0'].shape == (1 << 20,)


@pytest.mark.parametrize(
  'shape,error,words',
  [
    # NumPy's int64 product wraps to 0, which the empty data would have matched.
    ((1 << 32, 1 << 32), CorruptCheckpointError, 'would span 7.379e+19 bytes, more than any'),
    # Empty, but NumPy refuses the sides (or an int64 cannot hold them).
    ((1 << 61, 0), CorruptCheckpointError, 'would span 9.223e+18 bytes, more than any'),
    ((1 << 70, 0), CorruptCheckpointError, 'would span 4.722e+21 bytes, more than any'),
    ((-1, 0), UnsafePickleError, 'is not a tuple of sizes'),
  ],
)
def test_overflowing_shapes_get_the_loaders_error(tmp_path, shape, error, words):
  path = write(tmp_path / 'o.pkl', shared_state_bytes((1, shape, np.dtype('f4'), False, b''), 1))
  with pytest.raises(error) as err:
    load_quiet(path)
  assert str(err.value).startswith(f'{path}: ') and words in str(err.value)
  with pytest.raises(error, match=re.escape(words)):
    weights.load_pretrained(path, 'F0', verify_md5=False)


def test_shapes_are_checked_before_arrays_are_built(tmp_path, monkeypatch):
  """A narrow F1 file asked for as F0: refused from the placeholders' shapes, not one
  array built; the right variant builds every array once."""
  built = []
  to_numpy = released._Array.to_numpy  # pylint: disable=protected-access

  def spy(self):
    built.append(self.shape)
    return to_numpy(self)

  monkeypatch.setattr(released._Array, 'to_numpy', spy)  # pylint: disable=protected-access
  tree = model_tree('F1')
  path = write(tmp_path / 'narrow.pkl', released_bytes(tree))
  with pytest.raises(ParamsMismatchError) as err:
    weights.load_pretrained(path, 'F0', NUM_CLASSES, verify_md5=False, **NARROW)
  assert str(err.value).startswith(f'{path}: parameters do not match NFNet(')
  assert "pass variant='F1'" in str(err.value)
  assert built == []
  assert_trees_equal(
    tree, weights.load_pretrained(path, 'F1', NUM_CLASSES, verify_md5=False, **NARROW)
  )
  assert len(built) == sum(len(p) for p in tree.values())
