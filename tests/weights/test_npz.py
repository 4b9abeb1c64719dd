"""nfnet_jax.weights.npz: the pickle-free format (flat '//' keys, `__format__`,
`__variant__`), written atomically locally and to remote (gs://-style) paths."""

import os
import zipfile

import numpy as np
import pytest

from nfnet_jax import weights
from nfnet_jax.weights import CorruptCheckpointError, npz
from tests.weights.helpers import assert_trees_equal, small_tree, write


def test_flatten_and_unflatten():
  tree = small_tree()
  flat = weights.flatten_params(tree)
  assert sorted(flat) == sorted(f'{m}//{n}' for m, p in tree.items() for n in p)
  assert_trees_equal(tree, weights.unflatten_params({**flat, '__variant__': 'F0'}))
  with pytest.raises(ValueError, match="contains '//'"):
    weights.flatten_params({'a//b': {'w': np.ones(1)}})
  with pytest.raises(ValueError, match='starts with "__"'):
    weights.flatten_params({'__variant__': {'w': np.ones(1)}})
  with pytest.raises(ValueError, match='contains "/"'):
    weights.flatten_params({'m': {'a/b': np.ones(1)}})


def test_save_and_load_converted(tmp_path):
  tree = small_tree()
  dst = weights.save_converted(tree, tmp_path / 'p.npz', 'NF-RegNet-B0')
  assert dst == str(tmp_path / 'p.npz')
  # Plain numpy reads it without pickles; the metadata is there.
  with np.load(dst, allow_pickle=False) as archive:
    assert str(archive['__format__']) == 'nfnet_jax.params.v1'
    assert str(archive['__variant__']) == 'NF-RegNet-B0'
  params, variant = weights.load_converted(dst)
  assert variant == 'NF-RegNet-B0'
  assert_trees_equal(tree, params)
  # Written whole: no temporary file left beside it, the umask's permissions.
  assert os.listdir(tmp_path) == ['p.npz']
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(dst).st_mode & 0o777 == 0o666 & ~umask


def test_save_converted_keeps_an_existing_file(tmp_path):
  dst = tmp_path / 'p.npz'
  weights.save_converted(small_tree(0), dst, 'F0')
  before = dst.read_bytes()
  with pytest.raises(FileExistsError, match='overwrite'):
    weights.save_converted(small_tree(1), dst, 'F0')
  assert dst.read_bytes() == before
  weights.save_converted(small_tree(1), dst, 'F0', overwrite=True)
  assert_trees_equal(small_tree(1), weights.load_converted(dst)[0])
  assert os.listdir(tmp_path) == ['p.npz']


def test_remote_paths_round_trip():
  """Remote paths go through tf.io.gfile (ram:// stands in for gs://), whose files
  cannot seek: the archive is written sequentially and still reads back."""
  dst = f'ram://weights_npz_test_{os.getpid()}/run/p.npz'
  tree = small_tree(2)
  # overwrite=True: TF's RAM filesystem takes `p.npz` to exist while the temporary
  # `p.npz.tmp-*` does, so a first write without it fails there (not on gs://).
  assert weights.save_converted(tree, dst, 'F0', overwrite=True) == dst
  with pytest.raises(FileExistsError):
    weights.save_converted(tree, dst, 'F0')
  assert npz.read_head(dst) == b'PK\x03\x04'
  params, variant = weights.load_converted(dst)
  assert variant == 'F0'
  assert_trees_equal(tree, params)


def test_corrupt_converted_file(tmp_path):
  dst = tmp_path / 'c.npz'
  weights.save_converted(small_tree(), dst, 'F0')
  data = dst.read_bytes()
  write(dst, data[: len(data) // 2])
  with pytest.raises(CorruptCheckpointError, match='truncated or corrupt'):
    weights.load_pretrained(dst)
  np.savez(tmp_path / 'foreign.npz', a=np.ones(2))
  with pytest.raises(CorruptCheckpointError, match='not one written by nfnet_jax.convert'):
    weights.load_pretrained(tmp_path / 'foreign.npz')
  with pytest.raises(FileNotFoundError):
    weights.load_converted(tmp_path / 'missing.npz')


def test_object_arrays_are_not_loaded(tmp_path):
  """A converted-looking archive holding a pickled (object) array is refused unread."""
  path = tmp_path / 'o.npz'
  np.savez(
    path,
    **{'__format__': np.array('nfnet_jax.params.v1'), 'm//w': np.array([{'a': 1}], dtype=object)},
  )
  assert zipfile.is_zipfile(path)
  with pytest.raises(CorruptCheckpointError, match='truncated or corrupt'):
    weights.load_converted(path)
