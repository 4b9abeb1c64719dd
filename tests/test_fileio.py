"""nfnet_jax.fileio: atomic writes (local and remote) and shape formatting."""

import os
import stat

import pytest

from nfnet_jax import fileio


def test_fmt_shape_writes_tuples_as_python_does():
  assert fileio.fmt_shape((3, 3, 16, 32)) == '(3, 3, 16, 32)'
  assert fileio.fmt_shape([10]) == '(10,)'
  assert fileio.fmt_shape(()) == '()'


def test_is_remote():
  assert fileio.is_remote('gs://bucket/run') and fileio.is_remote('ram://x')
  assert not fileio.is_remote('/tmp/run') and not fileio.is_remote('workdirs/run')


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'sub' / 'f.json'
  fileio.atomic_write_text(path, 'old')
  assert path.read_text() == 'old'

  def failing(f):
    f.write(b'half of the new conte')
    raise OSError('No space left on device')

  with pytest.raises(OSError, match='No space left'):
    fileio.atomic_write(path, failing)
  assert path.read_text() == 'old'  # untouched
  assert sorted(os.listdir(path.parent)) == ['f.json']  # no temporary file left
  fileio.atomic_write_text(path, 'new')
  assert path.read_text() == 'new'


def test_atomic_write_without_overwrite_keeps_an_existing_file(tmp_path):
  path = tmp_path / 'weights.npz'
  fileio.atomic_write(path, lambda f: f.write(b'first'), overwrite=False)
  with pytest.raises(FileExistsError, match='overwrite'):
    fileio.atomic_write(path, lambda f: f.write(b'second'), overwrite=False)
  assert path.read_bytes() == b'first'
  assert sorted(os.listdir(tmp_path)) == ['weights.npz']


def test_atomic_write_gives_the_permissions_of_a_new_file(tmp_path):
  umask = os.umask(0o022)
  try:
    fileio.atomic_write_text(tmp_path / 'f', 'x')
  finally:
    os.umask(umask)
  assert stat.S_IMODE(os.stat(tmp_path / 'f').st_mode) == 0o644  # not mkstemp's 0600


def test_remote_paths_go_through_gfile():
  path = 'ram://fileio_test/dir/record.json'
  fileio.atomic_write_text(path, 'remote')
  assert fileio.read_text(path) == 'remote'
  with pytest.raises(FileExistsError):
    fileio.atomic_write_text(path, 'again', overwrite=False)
  assert fileio.read_text(path) == 'remote'
  assert fileio.gfile().listdir('ram://fileio_test/dir') == ['record.json']
