"""Tests for nfnet_jax.pretrained (safe loading of DeepMind's released weights) and the
nfnet_jax.convert CLI.

The released files are dill pickles (protocol 3) of a Haiku FlatMapping. The tests write
such streams themselves: a pure-Python Pickler that emits `GLOBAL module name` for
placeholder objects, so the streams reference `haiku._src.data_structures.FlatMapping`,
dill's helpers and numpy's `_reconstruct` exactly as the released files do, without
importing (or faking in sys.modules) haiku's or dill's modules.
"""
import hashlib
import pickle
import sys
import warnings

import numpy as np
import pytest

from nfnet_jax import convert as convert_cli
from nfnet_jax import pretrained
from nfnet_jax.pretrained import (CorruptCheckpointError, ParamsMismatchError,
                                  UnsafePickleError, UnverifiedChecksumWarning)

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


FLATMAPPING = Glob('haiku._src.data_structures', 'FlatMapping')
IMPORT_MODULE = Glob('dill._dill', '_import_module')
GET_ATTR = Glob('dill._dill', '_get_attr')
# How each writer references numpy's _reconstruct.
RECONSTRUCT = {
    'pickle_numpy1': Glob('numpy.core.multiarray', '_reconstruct'),
    'pickle_numpy2': Glob('numpy._core.multiarray', '_reconstruct'),
    # dill saves the builtin indirectly: _get_attr(_import_module(<C module>), name).
    'dill_numpy1': Call(GET_ATTR, Call(IMPORT_MODULE, 'numpy.core._multiarray_umath'),
                        '_reconstruct'),
    'dill_numpy2': Call(GET_ATTR, Call(IMPORT_MODULE, 'numpy._core._multiarray_umath'),
                        '_reconstruct'),
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

  dispatch[Glob] = save_glob
  dispatch[Call] = save_call
  dispatch[FlatMapping] = save_flat_mapping
  dispatch[np.ndarray] = save_ndarray


def released_bytes(tree, style='dill_numpy1'):
  """Bytes of `tree` in the released layout: FlatMapping of FlatMappings of arrays."""
  import io  # pylint: disable=g-import-not-at-top
  wrapped = FlatMapping({m: FlatMapping(dict(p)) for m, p in tree.items()})
  buf = io.BytesIO()
  StreamWriter(buf, RECONSTRUCT[style], style.endswith('numpy1')).dump(wrapped)
  return buf.getvalue()


def payload_bytes(obj, style='dill_numpy1'):
  """A released-format file whose classifier weight is `obj` (a hostile payload)."""
  return released_bytes({'NFNet/~/stem_conv0': {'w': np.ones(3, np.float32)},
                         'NFNet/~/linear': {'w': obj}}, style)


def globals_in(data):
  import pickletools  # pylint: disable=g-import-not-at-top
  return [arg for op, arg, _ in pickletools.genops(data) if op.name == 'GLOBAL']


def small_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'NFNet/~/stem_conv0': {'w': rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
                             'gain': np.ones(4, np.float32),
                             'bias': np.zeros(4, np.float32)},
      'NFNet/~/nf_block': {'skip_gain': np.array(0.25, np.float32)},
      'NFNet/~/linear': {'w': np.asfortranarray(rng.standard_normal((4, 3))
                                                 .astype(np.float32)),
                         'b': rng.standard_normal(3).astype(np.float32)},
  }


def model_tree(variant='F0', seed=0, num_classes=NUM_CLASSES, **kwargs):
  kwargs = kwargs or NARROW
  rng = np.random.default_rng(seed)
  shapes = pretrained.expected_param_shapes(variant, num_classes, **kwargs)
  return {m: {n: rng.standard_normal(s).astype(np.float32) for n, s in p.items()}
          for m, p in shapes.items()}


def shape_only_tree(variant, num_classes=1000, **kwargs):
  """Full-size trees without the memory: zero-stride broadcast views."""
  shapes = pretrained.expected_param_shapes(variant, num_classes, **kwargs)
  return {m: {n: np.broadcast_to(np.float32(0), s) for n, s in p.items()}
          for m, p in shapes.items()}


def assert_trees_equal(a, b):
  assert sorted(a) == sorted(b)
  for m in a:
    assert sorted(a[m]) == sorted(b[m]), m
    for n in a[m]:
      assert b[m][n].dtype == np.float32 and b[m][n].shape == a[m][n].shape, (m, n)
      np.testing.assert_array_equal(b[m][n], a[m][n])


def write(path, data):
  path.write_bytes(data)
  return path


def load_quiet(path, **kwargs):
  kwargs.setdefault('verify_md5', False)
  return pretrained.load_released_params(path, **kwargs)


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
  assert all(v.flags.writeable and v.flags.c_contiguous
             for p in out.values() for v in p.values())
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
  assert sink.size == pretrained.RELEASED_SIZES['F0'] == 285_976_842


@pytest.mark.parametrize('protocol', [3, 4])
def test_plain_pickle_of_a_dict_tree_loads(tmp_path, protocol):
  tree = small_tree(1)
  tree['NFNet/~/linear']['b'] = tree['NFNet/~/linear']['b'].astype('>f4')  # big-endian
  out = load_quiet(write(tmp_path / 'p.pkl', pickle.dumps(tree, protocol=protocol)))
  assert_trees_equal(tree, out)
  assert out['NFNet/~/linear']['b'].dtype.isnative


def test_narrow_f0_released_file_loads_checked(tmp_path):
  tree = model_tree('F0')
  path = write(tmp_path / 'narrow.pkl', released_bytes(tree))
  with pytest.warns(UnverifiedChecksumWarning, match='CHECKSUM MISMATCH'):
    out = pretrained.load_pretrained(path, 'F0', NUM_CLASSES, **NARROW)
  assert_trees_equal(tree, out)


# ---------------------------------------------------------------------------
# Hostile pickles: refused, naming the offender, with nothing run.


def hostile_payloads(marker):
  cmd = f'touch {marker}'
  return {
      'os.system': (Call(Glob('os', 'system'), cmd), 'os.system'),
      'posix.system': (Call(Glob('posix', 'system'), cmd), 'posix.system'),
      'builtins.eval': (Call(Glob('builtins', 'eval'), f'open({str(marker)!r}, "w")'),
                        'builtins.eval'),
      'builtins.getattr': (Call(Glob('builtins', 'getattr'), 1, 'real'), 'builtins.getattr'),
      'dill_os_system': (Call(Call(GET_ATTR, Call(IMPORT_MODULE, 'os'), 'system'), cmd),
                         "_import_module('os')"),
      'dill_subprocess': (Call(IMPORT_MODULE, 'subprocess'), "'subprocess'"),
      'dill_numpy_other_attr': (
          Call(Call(GET_ATTR, Call(IMPORT_MODULE, 'numpy.core._multiarray_umath'), 'scalar'),
               1), "'scalar'"),
      'dill_get_attr_on_string': (Call(GET_ATTR, 'os', '_reconstruct'), '_get_attr'),
      'numpy.load': (Call(Glob('numpy', 'load'), str(marker)), 'numpy.load'),
      'numpy.testing': (Call(Glob('numpy.testing._private.utils', 'runstring'),
                             f'open({str(marker)!r}, "w")', {}),
                        'numpy.testing._private.utils.runstring'),
      'numpy.core.multiarray.scalar': (Call(Glob('numpy.core.multiarray', 'scalar'), 1),
                                       'numpy.core.multiarray.scalar'),
      'ndarray_called': (Call(Glob('numpy', 'ndarray'), (10 ** 12,)), 'numpy.ndarray'),
      'reconstruct_wrong_args': (Call(RECONSTRUCT['pickle_numpy2'],
                                      Glob('numpy', 'dtype'), (0,), b'b'), '_reconstruct'),
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
  import io  # pylint: disable=g-import-not-at-top
  with pytest.raises(UnsafePickleError) as err:
    pretrained.SafeUnpickler(io.BytesIO(data)).load()
  assert offender in str(err.value)
  # And so does everything built on the loader.
  with pytest.raises(UnsafePickleError):
    pretrained.load_pretrained(path, 'F0', verify_md5=False)
  assert not marker.exists()


@pytest.mark.parametrize('data,opcode,offender', [
    (b'\x80\x03(X\x01\x00\x00\x00xios\nsystem\n.', 'INST', 'os.system'),
    (b'\x80\x03(cnumpy\ndtype\nX\x01\x00\x00\x00Oo.', 'OBJ', "numpy.dtype\\('O'"),
    (b'\x80\x03cnumpy\ndtype\n)\x81.', 'NEWOBJ', None),
    (b'\x80\x03X\x01\x00\x00\x00xQ.', 'BINPERSID', 'persistent id'),
    (b'\x80\x03\x82\x01.', 'EXT1', None),
])
def test_opcodes_that_call_things_are_refused(tmp_path, data, opcode, offender):
  with pytest.raises(UnsafePickleError, match=opcode):
    load_quiet(write(tmp_path / 'x.pkl', data))
  if offender:
    import io  # pylint: disable=g-import-not-at-top
    with pytest.raises(UnsafePickleError, match=offender):
      pretrained.SafeUnpickler(io.BytesIO(data)).load()


def test_build_cannot_modify_the_stand_ins(tmp_path):
  # GLOBAL numpy dtype; {'_fn': ...}; BUILD -- would rebind the stand-in's function.
  data = b'\x80\x03cnumpy\ndtype\n}X\x03\x00\x00\x00_fnX\x01\x00\x00\x00xsb.'
  with pytest.raises(UnsafePickleError, match='set state'):
    load_quiet(write(tmp_path / 'x.pkl', data))
  assert pretrained.ADMITTED_GLOBALS[('numpy', 'dtype')]('f4').dtype == np.float32


def test_dtype_stand_in_takes_numpy1_and_numpy2_flags_only():
  make_dtype = pretrained.ADMITTED_GLOBALS[('numpy', 'dtype')]
  assert make_dtype('f4', 0, 1).dtype == make_dtype('f4', False, True).dtype == np.float32
  for args in [('f4', 2, 1), ('f4', 0.0, 1), ('V8', 0, 1), ('O8', 0, 1), ('U4', 0, 1),
               (b'f4', 0, 1)]:
    with pytest.raises(UnsafePickleError, match='numpy.dtype'):
      make_dtype(*args)


def test_refusal_messages_stay_short(tmp_path):
  huge = Call(IMPORT_MODULE, 'x' * 10_000_000)
  with pytest.raises(UnsafePickleError) as err:
    load_quiet(write(tmp_path / 'x.pkl', payload_bytes(huge)))
  assert len(str(err.value)) < 1000 and "'xxxx" in str(err.value)


def test_admitted_globals_are_exactly_the_released_ones():
  assert set(pretrained.ADMITTED_GLOBALS) == {
      ('haiku._src.data_structures', 'FlatMapping'), ('numpy', 'ndarray'),
      ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
      ('numpy._core.multiarray', '_reconstruct'), ('dill._dill', '_import_module'),
      ('dill._dill', '_get_attr')}
  # None of them is a real numpy/haiku/dill object.
  for value in pretrained.ADMITTED_GLOBALS.values():
    assert type(value).__module__ == 'nfnet_jax.pretrained'


# ---------------------------------------------------------------------------
# Broken files.


def test_truncated_released_file(tmp_path):
  data = released_bytes(small_tree())
  path = write(tmp_path / 'F0_haiku.npz', data[:len(data) // 2])
  with pytest.raises(CorruptCheckpointError) as err:
    pretrained.load_released_params(path)
  msg = str(err.value)
  assert 'truncated or corrupt' in msg and 'Re-download' in msg
  assert '285,976,842' in msg
  # Without the released name there is no size to quote, but the rest holds.
  other = write(tmp_path / 'mine.pkl', data[:-1])  # just the STOP missing
  with pytest.raises(CorruptCheckpointError, match='truncated or corrupt'):
    pretrained.load_released_params(other)


def test_empty_and_non_pickle_files(tmp_path):
  with pytest.raises(CorruptCheckpointError, match='empty.*285,976,842.*Re-download'):
    pretrained.load_released_params(write(tmp_path / 'F0_haiku.npz', b''))
  with pytest.raises(CorruptCheckpointError, match='not a pickle'):
    pretrained.load_released_params(write(tmp_path / 'a.npz', b'<html>404 Not Found</html>'))
  with pytest.raises(CorruptCheckpointError, match='not a pickle'):
    pretrained.load_pretrained(write(tmp_path / 'b.npz', b'hello world\n'))
  with pytest.raises(CorruptCheckpointError, match='after the pickle ends'):
    pretrained.load_released_params(
        write(tmp_path / 'c.pkl', released_bytes(small_tree()) + b'junk'), verify_md5=False)
  # A stream claiming a 4 GiB bytes object in a tiny file: corrupt, no huge allocation.
  with pytest.raises(CorruptCheckpointError, match='truncated or corrupt'):
    pretrained.load_released_params(write(tmp_path / 'd.pkl', b'\x80\x03B\xff\xff\xff\xffab'))
  # A pickle of something that is not a parameter tree.
  with pytest.raises(CorruptCheckpointError, match='not a Haiku parameter dict'):
    load_quiet(write(tmp_path / 'e.pkl', pickle.dumps([1, 2], protocol=3)))
  # A real zip .npz given to the pickle loader is pointed at load_pretrained.
  np.savez(tmp_path / 'f.npz', a=np.ones(2))
  with pytest.raises(CorruptCheckpointError, match='load_pretrained'):
    pretrained.load_released_params(tmp_path / 'f.npz')


def test_array_with_wrong_byte_count_is_corrupt(tmp_path):
  data = released_bytes({'m': {'w': np.arange(4, dtype=np.float32)}})
  i = data.index(b'C\x10')  # SHORT_BINBYTES of 16 bytes: the array's data
  data = data[:i] + b'C\x0c' + data[i + 2:i + 14] + data[i + 18:]  # keep 12 of 16
  with pytest.raises(CorruptCheckpointError, match='should hold 16 bytes'):
    load_quiet(write(tmp_path / 'x.pkl', data))


# ---------------------------------------------------------------------------
# Checksums.


def test_md5_mismatch_warns_but_loads(tmp_path, monkeypatch):
  tree = small_tree()
  path = write(tmp_path / 'F0_haiku.npz', released_bytes(tree))
  with pytest.warns(UnverifiedChecksumWarning) as record:
    out = pretrained.load_released_params(path)
  assert_trees_equal(tree, out)
  msg = str(record[0].message)
  assert 'CHECKSUM MISMATCH' in msg and 'unverified' in msg
  assert pretrained.RELEASED_MD5['F0'] in msg and '285,976,842' in msg
  # The explicit variant picks the entry, whatever the name.
  other = write(tmp_path / 'weights.bin', released_bytes(tree))
  with pytest.warns(UnverifiedChecksumWarning, match=pretrained.RELEASED_MD5['F3']):
    pretrained.load_released_params(other, variant='F3')
  # A matching MD5 is silent.
  md5 = hashlib.md5(path.read_bytes()).hexdigest()
  assert pretrained.file_md5(path) == md5
  monkeypatch.setitem(pretrained.RELEASED_MD5, 'F0', md5)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    pretrained.load_released_params(path)


# ---------------------------------------------------------------------------
# Checking against the model.


def test_check_params_full_size_f0_and_wrong_variant():
  pretrained.check_params(shape_only_tree('F0'), 'F0')
  f1 = shape_only_tree('F1')
  assert pretrained.guess_variant(f1) == 'F1'
  assert pretrained.guess_variant(shape_only_tree('F0+')) == 'F0+'
  with pytest.raises(ParamsMismatchError) as err:
    pretrained.check_params(f1, 'F0')
  msg = str(err.value)
  assert "variant='F1'" in msg and 'stage depths [2, 4, 12, 6]' in msg
  assert '87 unexpected module(s): ' in msg and 'NFNet/~/nf_block_12, ' in msg
  assert '3 missing module(s): NFNet/~/nf_block_1/~/conv_shortcut' in msg


def test_check_params_names_path_and_both_shapes():
  f0 = pretrained.expected_param_shapes('F0', NUM_CLASSES, **NARROW)
  f1_tree = model_tree('F1')
  with pytest.raises(ParamsMismatchError) as err:
    pretrained.check_params(f1_tree, 'F0', NUM_CLASSES, **NARROW)
  msg = str(err.value)
  module, name = next((m, n) for m in f0 for n in f0[m]
                      if m in f1_tree and f1_tree[m][n].shape != f0[m][n])
  assert (f'{module}/{name}: expected shape {f0[module][name]}, found '
          f'{f1_tree[module][name].shape}') in msg
  assert "pass variant='F1'" in msg


def test_check_params_other_mistakes():
  tree = model_tree('F0')
  pretrained.check_params(tree, 'F0', NUM_CLASSES, **NARROW)
  with pytest.raises(ParamsMismatchError, match='num_classes=10'):
    pretrained.check_params(tree, 'F0', 1000, **NARROW)
  bad = {m: dict(p) for m, p in tree.items()}
  del bad['NFNet/~/final_conv']['gain']
  bad['NFNet/~/stem_conv0']['extra'] = np.zeros(2, np.float32)
  bad['NFNet/~/stem_conv1']['w'] = bad['NFNet/~/stem_conv1']['w'].transpose(3, 2, 0, 1)
  bad['NFNet/~/linear']['b'] = bad['NFNet/~/linear']['b'].astype(np.int32)
  with pytest.raises(ParamsMismatchError) as err:
    pretrained.check_params(bad, 'F0', NUM_CLASSES, **NARROW)
  msg = str(err.value)
  assert 'missing parameter NFNet/~/final_conv/gain' in msg
  assert 'unexpected parameter NFNet/~/stem_conv0/extra' in msg
  assert 'NFNet/~/stem_conv1/w: expected shape (3, 3, 16, 32), found (32, 16, 3, 3)' in msg
  assert 'OIHW' in msg and 'dtype int32' in msg
  renamed = {m.replace('NFNet/', 'nfnet/'): p for m, p in tree.items()}
  with pytest.raises(ParamsMismatchError, match="under 'NFNet'"):
    pretrained.check_params(renamed, 'F0', NUM_CLASSES, **NARROW)


@pytest.mark.parametrize('family,variants', [
    ('NF_ResNet', ['ResNet50', 'ResNet101', 'ResNet152', 'ResNet200', 'ResNet288',
                   'ResNet600']),
    ('NF_RegNet', [f'B{k}' for k in range(9)]),
])
def test_other_families_are_recognised_and_checked(family, variants):
  """NF-ResNet and NF-RegNet trees (the released code's names) are told apart by their
  root module and recognised by their stage depths and widths, at full size."""
  trees = {v: shape_only_tree(v) for v in variants}
  for variant, tree in trees.items():
    assert {m.split('/~/')[0] for m in tree} == {family}
    assert pretrained.guess_variant(tree) == variant
    pretrained.check_params(tree, variant)
    assert pretrained.classifier_module(variant) == f'{family}/~/linear'
  # B0 and B1 share stage widths; only the depths tell them apart.
  wrong = variants[1]
  with pytest.raises(ParamsMismatchError) as err:
    pretrained.check_params(trees[variants[0]], wrong)
  msg = str(err.value)
  assert f"pass variant='{variants[0]}'" in msg
  assert msg.startswith(f"parameters do not match {family.replace('_', '')}(")


def test_family_mix_ups_are_named():
  resnet = shape_only_tree('ResNet50')
  with pytest.raises(ParamsMismatchError) as err:
    pretrained.check_params(resnet, 'F0')
  msg = str(err.value)
  assert "under ['NF_ResNet']" in msg and "'NFNet'" in msg
  with pytest.raises(ValueError) as err:
    pretrained.expected_param_shapes('ResNet18')
  assert all(v in str(err.value) for v in ('F0', 'ResNet50', 'B0'))
  # An argument of another family's model: a clear error, not a TypeError.
  with pytest.raises(ParamsMismatchError, match='group_size'):
    pretrained.expected_param_shapes('ResNet50', 10, group_size=8)


def test_narrow_nf_regnet_round_trip_without_naming_the_variant(tmp_path):
  tree = model_tree('B2', width=0.25)
  assert pretrained.guess_variant(tree, width=0.25) == 'B2'
  assert pretrained.guess_variant(tree) == 'B2'       # another width: same proportions
  dst = pretrained.save_converted(tree, tmp_path / 'b2.npz', 'B2')
  loaded = pretrained.load_pretrained(dst, num_classes=None, width=0.25)
  assert_trees_equal(tree, loaded)
  with pytest.raises(ParamsMismatchError, match="converted for variant 'B2'"):
    pretrained.load_pretrained(dst, 'B3', width=0.25)


# ---------------------------------------------------------------------------
# Conversion.


def test_convert_round_trip_and_overwrite(tmp_path):
  tree = model_tree('F0', seed=3)
  src = write(tmp_path / 'F0_haiku.npz', released_bytes(tree))
  dst = tmp_path / 'F0_params.npz'
  with pytest.warns(UnverifiedChecksumWarning):
    summary = pretrained.convert(src, dst, num_classes=NUM_CLASSES, **NARROW)
  assert summary['variant'] == 'F0'  # from the file name
  assert summary['values'] == sum(v.size for p in tree.values() for v in p.values())
  with np.load(dst, allow_pickle=False) as archive:
    assert str(archive['__variant__']) == 'F0'
    flat = {k: archive[k] for k in archive.files}
  assert (flat['NFNet/~/nf_block_1/~/conv1//w'].shape
          == tree['NFNet/~/nf_block_1/~/conv1']['w'].shape)
  assert_trees_equal(tree, pretrained.unflatten_params(flat))
  # The variant comes from the file's metadata.
  loaded = pretrained.load_pretrained(dst, num_classes=NUM_CLASSES, **NARROW)
  assert_trees_equal(tree, loaded)
  with pytest.raises(ParamsMismatchError, match="converted for variant 'F0'"):
    pretrained.load_pretrained(dst, 'F1', NUM_CLASSES, **NARROW)

  before = dst.read_bytes()
  with pytest.raises(FileExistsError, match='overwrite'):
    pretrained.convert(src, dst, 'F0', num_classes=NUM_CLASSES, verify_md5=False, **NARROW)
  assert dst.read_bytes() == before
  other = model_tree('F0', seed=4)
  write(src, released_bytes(other))
  pretrained.convert(src, dst, 'F0', overwrite=True, num_classes=NUM_CLASSES,
                     verify_md5=False, **NARROW)
  assert_trees_equal(other, pretrained.load_pretrained(dst, 'F0', NUM_CLASSES, **NARROW))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['F0_haiku.npz', 'F0_params.npz']


def test_convert_refuses_unchecked_params(tmp_path):
  src = write(tmp_path / 'x.pkl', released_bytes(model_tree('F1')))
  with pytest.raises(ParamsMismatchError):
    pretrained.convert(src, tmp_path / 'out.npz', 'F0', num_classes=NUM_CLASSES,
                       verify_md5=False, **NARROW)
  assert not (tmp_path / 'out.npz').exists()
  assert [p.name for p in tmp_path.iterdir()] == ['x.pkl']


def test_corrupt_converted_file(tmp_path):
  dst = tmp_path / 'c.npz'
  pretrained.save_converted(small_tree(), dst, 'F0')
  data = dst.read_bytes()
  write(dst, data[:len(data) // 2])
  with pytest.raises(CorruptCheckpointError, match='truncated or corrupt'):
    pretrained.load_pretrained(dst)
  np.savez(tmp_path / 'foreign.npz', a=np.ones(2))
  with pytest.raises(CorruptCheckpointError, match='not one written by nfnet_jax.convert'):
    pretrained.load_pretrained(tmp_path / 'foreign.npz')


def test_cli(tmp_path, capsys):
  tree = model_tree('F0', seed=5)
  src = write(tmp_path / 'src.pkl', released_bytes(tree))
  dst = tmp_path / 'out.npz'
  args = ['--variant', 'F0', '--num-classes', str(NUM_CLASSES), '--width', '0.0625',
          '--group-size', '8', '--no-verify-md5', str(src), str(dst)]
  assert convert_cli.main(args) == 0
  assert 'NFNet-F0' in capsys.readouterr().out
  assert_trees_equal(tree, pretrained.load_pretrained(dst, 'F0', NUM_CLASSES, **NARROW))
  assert convert_cli.main(args) == 1
  assert 'already exists' in capsys.readouterr().err
  assert convert_cli.main(args + ['--overwrite']) == 0
  hostile = write(tmp_path / 'evil.pkl', payload_bytes(Call(Glob('os', 'system'), 'true')))
  assert convert_cli.main(['--variant', 'F0', str(hostile), str(tmp_path / 'e.npz')]) == 1
  assert 'os.system' in capsys.readouterr().err
  assert not (tmp_path / 'e.npz').exists()
