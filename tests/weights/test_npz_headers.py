""".npz weights are checked from their headers before their data costs memory: each
entry's .npy header (dtype, shape, byte count against the zip member) and, when the
model is known, every declared shape against the model's, before anything is inflated.

The crafted archives are deflated zips written by hand (`write_deflated_npz`): a header
declaring half a gigabyte of zeros takes half a megabyte of file, with honest sizes and
CRCs, as np.savez_compressed would write it.
"""

import collections
import io
import os
import re
import tempfile
import zipfile

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest

from nfnet_jax import weights
from nfnet_jax.weights import CorruptCheckpointError, ParamsMismatchError, npz
from tests.weights.helpers import (
  NARROW,
  NUM_CLASSES,
  assert_trees_equal,
  converted_members,
  model_tree,
  npy_bytes,
  npy_header,
  small_tree,
  traced_peak,
  write_deflated_npz,
)

HUGE = 1 << 29  # bytes of zeros a crafted entry declares (512 MiB; ~0.5 MB of file)
MEMORY_BOUND = 200 << 20  # what a refused file may cost, far below HUGE
LINEAR_W = 'NFNet/~/linear//w.npy'


@pytest.fixture
def read_counts(monkeypatch):
  """{member name: bytes read from it}: zipfile's reads, counted."""
  counts = collections.Counter()
  read = zipfile.ZipExtFile.read

  def counting_read(self, n=-1):
    data = read(self, n)
    counts[self.name] += len(data)
    return data

  monkeypatch.setattr(zipfile.ZipExtFile, 'read', counting_read)
  return counts


def header_length(member: bytes) -> int:
  """The bytes before an .npy member's data."""
  f = io.BytesIO(member)
  npz.read_npy_header(f)
  return f.tell()


def test_hand_made_archives_are_what_numpy_writes(tmp_path):
  """The crafted files are honest zips: numpy reads them, their CRCs check out."""
  a = np.arange(12, dtype='>f8').reshape(3, 4)
  path = write_deflated_npz(
    tmp_path / 'h.npz',
    {'a.npy': npy_bytes(a), 'z.npy': (npy_header((3 << 20,), '|u1'), 3 << 20)},
  )
  assert path.stat().st_size < 8 << 10
  with zipfile.ZipFile(path) as archive:
    assert archive.testzip() is None
    assert archive.getinfo('z.npy').compress_type == zipfile.ZIP_DEFLATED
  with np.load(path, allow_pickle=False) as archive:
    np.testing.assert_array_equal(archive['a'], a)
    assert archive['a'].dtype == a.dtype
    z = archive['z']
    assert z.shape == (3 << 20,) and not z.any()


def test_huge_declared_shape_is_refused_before_inflating(tmp_path, read_counts):
  """One entry of a narrow F0 file declares 512 MiB: refused from its header, against
  the model, with the file and the entry named; nothing of it inflated."""
  weights.expected_param_shapes('F0', NUM_CLASSES, **NARROW)  # warm: not in the peak
  members = converted_members(model_tree('F0'))
  members[LINEAR_W] = (npy_header((HUGE // 4096, 1024)), HUGE)
  path = write_deflated_npz(tmp_path / 'huge.npz', members)
  assert path.stat().st_size < 2 << 20

  def load():
    with pytest.raises(ParamsMismatchError) as err:
      weights.load_pretrained(path, 'F0', NUM_CLASSES, **NARROW)
    msg = str(err.value)
    assert msg.startswith(f'{path}: parameters do not match NFNet(')
    assert 'NFNet/~/linear/w: expected shape (' in msg and 'found (131072, 1024)' in msg

  assert traced_peak(load) < MEMORY_BOUND
  assert read_counts[LINEAR_W] == len(npy_header((HUGE // 4096, 1024)))


def test_extra_entries_are_not_inflated(tmp_path, read_counts):
  """More than the model needs: an unexpected huge parameter is refused from its header;
  a member that is no parameter is never opened, and the file loads exactly."""
  weights.expected_param_shapes('F0', NUM_CLASSES, **NARROW)
  tree = model_tree('F0', seed=5)
  members = converted_members(tree)
  extra = 'NFNet/~/linear//extra.npy'
  path = write_deflated_npz(
    tmp_path / 'extra.npz', {**members, extra: (npy_header((HUGE // 4,)), HUGE)}
  )

  def refuse():
    with pytest.raises(ParamsMismatchError, match=r'unexpected parameter NFNet/~/linear/extra'):
      weights.load_pretrained(path, 'F0', NUM_CLASSES, **NARROW)

  assert traced_peak(refuse) < MEMORY_BOUND
  assert read_counts[extra] == len(npy_header((HUGE // 4,)))
  assert all(read_counts[name] <= header_length(members[name]) for name in members if '//' in name)

  notes = write_deflated_npz(
    tmp_path / 'notes.npz', {**members, 'notes.npy': (npy_header((HUGE,), '|u1'), HUGE)}
  )
  read_counts.clear()
  loaded = {}
  peak = traced_peak(
    lambda: loaded.update(weights.load_pretrained(notes, 'F0', NUM_CLASSES, **NARROW))
  )
  assert peak < MEMORY_BOUND
  assert_trees_equal(tree, loaded)
  assert read_counts['notes.npy'] == 0


def test_wrong_variant_is_refused_before_inflating(tmp_path, read_counts):
  """A full-size F1 file (530 MB of float32 zeros, half a megabyte deflated, no
  `__variant__`) asked for as F0: refused from the headers alone, with the hint."""
  weights.expected_param_shapes('F0')
  shapes = weights.expected_param_shapes('F1')
  members, headers = {'__format__.npy': npy_bytes(np.array('nfnet_jax.params.v1'))}, {}
  for module, params in shapes.items():
    for name, shape in params.items():
      header = npy_header(shape)
      headers[f'{module}//{name}.npy'] = len(header)
      members[f'{module}//{name}.npy'] = (header, 4 * int(np.prod(shape)))
  declared = sum(4 * int(np.prod(s)) for p in shapes.values() for s in p.values())
  assert declared > 2 * MEMORY_BOUND
  path = write_deflated_npz(tmp_path / 'f1.npz', members)
  assert path.stat().st_size < 2 << 20

  def load():
    with pytest.raises(ParamsMismatchError) as err:
      weights.load_pretrained(path, 'F0')
    assert str(err.value).startswith(f'{path}: parameters do not match NFNet(')
    assert "pass variant='F1'" in str(err.value)

  assert traced_peak(load) < MEMORY_BOUND
  assert all(read_counts[name] <= length for name, length in headers.items())
  assert sum(read_counts[name] for name in headers) == sum(headers.values())


def _v2_claiming(length: int) -> bytes:
  return b'\x93NUMPY\x02\x00' + length.to_bytes(4, 'little')


# name: (what replaces the classifier weight's member, words of the refusal)
BAD_ENTRIES = {
  'overflowing_shape': (
    npy_header((1 << 40, 1 << 40)),
    r'declares shape \(1099511627776, 1099511627776\) of float32: 4\.836e\+24 bytes, '
    r'more than any array can hold',
  ),
  'overflowing_product_of_small_sides': (
    npy_header((1 << 16,) * 5, '<f8'),
    r'declares shape \(65536, 65536, 65536, 65536, 65536\) of float64: .* more than any',
  ),
  # Empty, but NumPy refuses such sides (its own ValueError, before this check).
  'empty_with_huge_sides': (
    npy_header((1 << 61, 0)),
    r'declares shape \(2305843009213693952, 0\) of float32: 9\.223e\+18 bytes, more than',
  ),
  'negative_side': (npy_header((-1, 4)), r'declares shape \(-1, 4\), which is not a tuple'),
  'bool_side': (npy_header((True, 4)), r'declares shape \(True, 4\), which is not a tuple'),
  'object_dtype': (npy_header((2,), '|O'), r'declares dtype object, which holds Python objects'),
  'string_dtype': (
    (npy_header((2,), '<U4'), 32),
    r'declares dtype <U4, not a plain numeric one',
  ),
  'structured_dtype': (
    (npy_header((2,), [('a', '<f4')]), 8),
    r'declares dtype .*, not a plain numeric one',
  ),
  'more_data_than_declared': (
    (npy_header((4, 3)), 52),
    r'declares shape \(4, 3\) of float32 \(176 bytes with its header\), but its zip '
    r'member holds 180 bytes',
  ),
  'less_data_than_declared': (
    (npy_header((HUGE // 4,)), 16),
    r'declares shape \(134217728,\) of float32 \(536,871,040 bytes with its header\), but '
    r'its zip member holds 144 bytes',
  ),
  # numpy would read all 4 GiB the length field claims (here: the 512 MiB the member
  # has) before comparing it with its limit.
  'header_length_claiming_4_gib': (
    (_v2_claiming((1 << 32) - 1), HUGE),
    r'has a 4,294,967,295-byte \.npy header \(at most 10,000 expected\)',
  ),
  'format_version_3': (b'\x93NUMPY\x03\x00' + bytes(8), r'is an \.npy of format version 3\.0'),
  'not_npy': (b'PK\x03\x04 not an array', r'has an unreadable \.npy header \(ValueError: '),
  'garbled_header_text': (
    npy_header((2,)).replace(b"'shape'", b"'shope'"),
    r'has an unreadable \.npy header',
  ),
  'header_cut_short': (npy_header((2,))[:20], r'ends inside its \.npy header'),
}


@pytest.mark.parametrize('name', sorted(BAD_ENTRIES))
def test_bad_headers_get_the_loaders_error(tmp_path, name):
  """Each refused header: CorruptCheckpointError naming the file and the entry, from
  the loader itself (never NumPy's error), at no cost in memory."""
  content, words = BAD_ENTRIES[name]
  members = converted_members(small_tree())
  members[LINEAR_W] = content
  path = write_deflated_npz(tmp_path / f'{name}.npz', members)
  expected = rf"^{re.escape(str(path))}: entry 'NFNet/~/linear//w' {words}.*: it is truncated or "

  def load():
    with pytest.raises(CorruptCheckpointError, match=expected):
      weights.load_converted(path)
    with pytest.raises(CorruptCheckpointError, match=expected):
      weights.load_pretrained(path, 'F0')

  assert traced_peak(load) < MEMORY_BOUND


def test_bad_archives_get_the_loaders_error(tmp_path):
  members = converted_members(small_tree())
  twice = write_deflated_npz(tmp_path / 'twice.npz', [*members.items(), *members.items()])
  with pytest.raises(CorruptCheckpointError, match="entry 'NFNet/~/.*' is stored twice"):
    weights.load_converted(twice)
  readme = write_deflated_npz(tmp_path / 'readme.npz', {**members, 'README': b'hello'})
  with pytest.raises(CorruptCheckpointError, match="holds the member 'README', which is not"):
    weights.load_converted(readme)
  members['__variant__.npy'] = (npy_header((HUGE // 4,), '<U1'), HUGE)
  long_variant = write_deflated_npz(tmp_path / 'long.npz', members)
  with pytest.raises(CorruptCheckpointError, match="entry '__variant__' should be a short string"):
    weights.load_converted(long_variant)
  # A CRC that does not match the data: caught when the entry is read.
  good = write_deflated_npz(tmp_path / 'good.npz', converted_members(small_tree()))
  data = bytearray(good.read_bytes())
  # zipfile checks the central directory's CRC: 16 bytes into the entry, whose name
  # (the last occurrence) starts 46 bytes in.
  data[data.rindex(LINEAR_W.encode()) - 30] ^= 0xFF
  bad_crc = tmp_path / 'crc.npz'
  bad_crc.write_bytes(bytes(data))
  with pytest.raises(CorruptCheckpointError, match="entry 'NFNet/~/linear//w' cannot be read"):
    weights.load_converted(bad_crc)


def test_compressed_files_load_exactly(tmp_path):
  """np.savez_compressed's files (deflated), Fortran-ordered and big-endian entries
  included, load exactly: as stored by `load_converted`, as float32 by load_pretrained."""
  tree = model_tree('F0', seed=7)
  flat = weights.flatten_params(tree)
  flat['NFNet/~/linear//w'] = np.asfortranarray(flat['NFNet/~/linear//w'])
  flat['NFNet/~/stem_conv0//w'] = flat['NFNet/~/stem_conv0//w'].astype('>f4')
  path = tmp_path / 'c.npz'
  np.savez_compressed(path, __format__=np.array('nfnet_jax.params.v1'), **flat)
  params, variant = weights.load_converted(path)
  assert variant is None
  with np.load(path, allow_pickle=False) as archive:
    for key, value in weights.flatten_params(params).items():
      want = archive[key]
      assert value.dtype == want.dtype and value.shape == want.shape, key
      assert value.flags.f_contiguous == want.flags.f_contiguous, key
      assert value.tobytes('A') == want.tobytes('A'), key
  assert params['NFNet/~/linear']['w'].flags.f_contiguous
  assert params['NFNet/~/stem_conv0']['w'].dtype == np.dtype('>f4')
  assert_trees_equal(tree, weights.load_pretrained(path, 'F0', NUM_CLASSES, **NARROW))


DTYPES = ['<f4', '>f4', '<f8', '<f2', '|b1', '<i4', '>i8', '|u1', '|i1', '<c8', '>c16']


@settings(max_examples=60, deadline=None)
@given(
  array=hnp.arrays(
    st.sampled_from(DTYPES).map(np.dtype),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
  ),
  fortran=st.booleans(),
)
def test_header_reader_agrees_with_numpy(array, fortran):
  """On honest .npy bytes the header reader says what np.load finds, and leaves the
  stream at the data; whole archives read back exactly what np.load reads."""
  if fortran:
    array = np.asfortranarray(array)
  data = npy_bytes(array)
  f = io.BytesIO(data)
  header = npz.read_npy_header(f)
  want = np.load(io.BytesIO(data), allow_pickle=False)
  assert header.shape == want.shape and header.dtype == want.dtype
  # np.save writes Fortran order only for arrays not also C-contiguous (e.g. not 1-D).
  assert header.fortran_order == (array.flags.f_contiguous and not array.flags.c_contiguous)
  assert f.tell() == header.header_bytes and header.header_bytes + header.nbytes == len(data)

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'p.npz')
    np.savez_compressed(path, __format__=np.array('nfnet_jax.params.v1'), **{'m//w': array})
    with npz.ConvertedFile(path) as archive:
      placeholder = archive.shapes()['m']['w']
      assert placeholder.shape == want.shape and placeholder.dtype == want.dtype
      got = archive.read_params()['m']['w']
  assert got.dtype == want.dtype and got.shape == want.shape
  assert got.flags.f_contiguous == want.flags.f_contiguous
  assert got.tobytes('A') == want.tobytes('A')


def _numpy_can_make(shape, dtype) -> bool:
  try:
    np.broadcast_to(np.zeros((), dtype), shape)
  except (ValueError, OverflowError):
    return False
  return True


@settings(max_examples=200, deadline=None)
@given(
  shape=st.lists(
    st.one_of(st.integers(0, 4), st.integers(0, 1 << 66), st.sampled_from([1 << 31, 1 << 61])),
    max_size=4,
  ),
  dtype=st.sampled_from(DTYPES).map(np.dtype),
)
def test_header_reader_refuses_exactly_the_shapes_numpy_cannot_make(shape, dtype):
  """Declared shapes of any size: accepted exactly when NumPy can make an array of
  them, refused with the reader's own message otherwise (never NumPy's error later)."""
  f = io.BytesIO(npy_header(shape, dtype.str))
  if _numpy_can_make(tuple(shape), dtype):
    header = npz.read_npy_header(f)
    assert header.shape == tuple(shape) and header.dtype == dtype
    assert header.nbytes == int(np.prod(shape, dtype=object)) * dtype.itemsize
  else:
    with pytest.raises(ValueError, match='more than any array can hold'):
      npz.read_npy_header(f)
