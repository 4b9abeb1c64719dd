"""The digits source: its fixed split, its preprocessing, and the image-folder command."""

import collections
import hashlib
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from sklearn import datasets as sk_datasets

from nfnet_jax import data
from nfnet_jax.data import digits
from tests.data.helpers import MEAN, STD, data_config, denorm, raw_split

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_split_is_fixed_disjoint_and_stratified():
  train, test = digits.split_indices('train'), digits.split_indices('test')
  assert len(train) == 1437 and len(test) == 360
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
  # Stable: the same on every call, and frozen (a changed split breaks comparability).
  np.testing.assert_array_equal(digits._split_indices.__wrapped__()['test'], test)
  assert hashlib.sha256(test.astype('<i8').tobytes()).hexdigest() == (
    'd9a9f8df571cdcbf9686f0ce69b192da80cdd31074905ab145a5b463224a44d5'
  )
  # Stratified: every class contributes 20% of its examples to test, to within one example.
  labels = sk_datasets.load_digits().target
  per_class = np.bincount(labels, minlength=10)
  test_per_class = np.bincount(labels[test], minlength=10)
  assert np.all(np.abs(test_per_class - per_class * 360 / 1797) < 1)
  # load_split agrees with sklearn's raw arrays.
  images, y = digits.load_split('test')
  raw_images, raw_y = raw_split('test')
  np.testing.assert_array_equal(images, raw_images)
  np.testing.assert_array_equal(y, raw_y)


def test_eval_at_native_size_is_exact_normalisation_of_raw():
  cfg = data_config(image_size=8)
  batches = list(data.eval_iterator(cfg, split='test', per_device_batch=50, local_devices=2))
  assert (
    len(batches) == data.eval_steps(cfg, split='test', per_device_batch=50, local_devices=2) == 4
  )
  for b in batches:
    assert b['images'].shape == (2, 50, 8, 8, 3) and b['images'].dtype == np.float32
    assert b['labels'].dtype == np.int32 and b['mask'].dtype == np.float32
  images = np.concatenate([b['images'].reshape(-1, 8, 8, 3) for b in batches])
  labels = np.concatenate([b['labels'].reshape(-1) for b in batches])
  mask = np.concatenate([b['mask'].reshape(-1) for b in batches])
  assert mask.sum() == 360 and np.all(mask[:360] == 1) and np.all(mask[360:] == 0)
  raw, raw_y = raw_split('test')
  # Normalised images against NumPy, per channel, and the de-normalised ones against raw.
  expected = (raw[..., None] * 255 / 16 - MEAN) / STD
  np.testing.assert_allclose(images[:360], expected, atol=1e-5)
  for c in range(3):
    np.testing.assert_allclose(denorm(images[:360])[..., c], raw * 255 / 16, atol=1e-3)
  real64 = images[:360].astype(np.float64)  # Accumulate statistics in float64.
  np.testing.assert_allclose(real64.mean((0, 1, 2)), expected.mean((0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(real64.std((0, 1, 2)), expected.std((0, 1, 2)), atol=1e-5)
  np.testing.assert_array_equal(labels[:360], raw_y)
  assert np.all(images[360:] == 0) and np.all(labels[360:] == 0)


def _bilinear_upsample_np(x, size):
  """NumPy bilinear resize, half-pixel centres, no antialiasing (x: [N, h, w])."""

  def weights(n_in, n_out):
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (pos - lo))
    np.add.at(m, (np.arange(n_out), hi), pos - lo)
    return m

  wh, ww = weights(x.shape[1], size), weights(x.shape[2], size)
  return np.einsum('oh,nhw,pw->nop', wh, x, ww)


def test_eval_resize_is_bilinear_half_pixel_without_antialias():
  batch = next(
    data.eval_iterator(
      data_config(image_size=32), split='test', per_device_batch=16, local_devices=1
    )
  )
  raw, _ = raw_split('test')
  expected = _bilinear_upsample_np(raw[:16] * 255 / 16, 32)
  np.testing.assert_allclose(denorm(batch['images'][0])[..., 0], expected, atol=1e-3)


def test_augmentation_is_a_small_translation_without_flips():
  cfg = data_config(image_size=8, augment=True, max_shift=0.125)  # Pad 1 px: shifts in {-1,0,1}.
  b = next(data.train_iterator(cfg, per_device_batch=32, local_devices=1, seed=0))
  images = np.rint(b['images'][0][..., 0].astype(np.float32) * 16 / 255)
  labels = b['labels'][0]
  train_raw, train_y = raw_split('train')
  padded = np.pad(train_raw, ((0, 0), (1, 1), (1, 1)))
  shifts = {
    (dy, dx): padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
  }
  used = collections.Counter()
  for img, label in zip(images, labels, strict=True):
    matches = [
      s
      for s, shifted in shifts.items()
      if np.any(np.all(shifted[train_y == label] == img, axis=(1, 2)))
    ]
    assert matches, 'augmented image is not a translation of a train example of its class'
    used[matches[0]] += 1
  assert sum(n for s, n in used.items() if s != (0, 0)) > 0


# ---------------------------------------------------------------------------------------
# The test digits as an image folder.
# ---------------------------------------------------------------------------------------


def test_write_folder_splits_the_test_digits_by_position(tmp_path):
  counts = digits.write_folder(str(tmp_path), 'parity')
  assert counts == {'train': 180, 'val': 180}
  assert sorted(os.listdir(tmp_path)) == ['train', 'val']
  assert sorted(os.listdir(tmp_path / 'train')) == ['even', 'odd']
  images, labels = digits.load_split('test')
  with Image.open(tmp_path / 'val' / ('even', 'odd')[labels[1] % 2] / '001.png') as im:
    assert im.mode == 'L' and im.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(im), np.rint(images[1].astype(float) * 255 / 16))


def test_write_folder_command(tmp_path, capsys):
  root = tmp_path / 'digits'
  assert digits.main(['--write-folder', str(root), '--task', 'digits']) == 0
  assert f'wrote 180 train and 180 val images (digits) to {root}' in capsys.readouterr().out
  assert sorted(os.listdir(root / 'val')) == [str(d) for d in range(10)]
  assert sum(len(os.listdir(root / 'train' / d)) for d in os.listdir(root / 'train')) == 180
  assert digits.main(['--task', 'parity']) == 2  # --write-folder is required
  assert 'write_folder' in capsys.readouterr().err
  assert digits.main(['--write_folder', str(root), '--task', 'odd']) == 2
  assert digits.main(['--write_folder', str(root), 'extra']) == 2
  assert "unexpected arguments ['extra']" in capsys.readouterr().err


def test_write_folder_runs_as_a_module(tmp_path):
  root = tmp_path / 'parity'
  result = subprocess.run(
    [sys.executable, '-m', 'nfnet_jax.data.digits', '--write-folder', str(root)],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'wrote 180 train and 180 val images (parity) to {root}' in result.stdout
  assert sorted(os.listdir(root / 'train')) == ['even', 'odd']
