"""The image-folder source: layouts, odd and corrupt files, sharding."""

import collections
import io
import logging
import os

import numpy as np
from PIL import Image
import pytest

from nfnet_jax import data
from nfnet_jax.data import folder, preprocess

SIZE = 16


def _config(root, **overrides):
  cfg = data.default_data_config()
  cfg.update(
    name='folder', folder=str(root), image_size=SIZE, eval_image_size=SIZE, shuffle_buffer=64
  )
  cfg.update(overrides)
  folder._INDEX_CACHE.clear()  # each test builds its own tree under a fresh tmp_path
  return cfg


def _colour(i):
  """A distinct flat RGB colour per example id, so examples can be recognised after
  resizing (bicubic of a constant image is that constant)."""
  return (40 + (i * 37) % 180, 40 + (i * 71) % 180, 40 + (i * 13) % 180)


def _save(path, i, fmt='PNG', mode='RGB', size=(23, 19)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.new('RGB', size, _colour(i))
  if mode != 'RGB':
    img = img.convert(mode)
  img.save(path, fmt)


def _flat_tree(root, per_class=(5, 4, 6), names=('cat', 'ant', 'bee')):
  """root/<class>/<i>.png with distinct colours; returns {colour: class_name}."""
  truth, i = {}, 0
  for name, n in zip(names, per_class, strict=True):
    for _ in range(n):
      _save(os.path.join(root, name, f'{i:03d}.png'), i)
      truth[_colour(i)] = name
      i += 1
  return truth


def _denormalize_image(images):
  """NumPy inverse of the eval pipeline's normalisation: -> 0..255 float32."""
  return np.asarray(images, np.float32) * np.asarray(
    preprocess.STDDEV_RGB, np.float32
  ) + np.asarray(preprocess.MEAN_RGB, np.float32)


def _recognise(batches, class_names):
  """Masked eval batches -> Counter of (colour, class name)."""
  seen = collections.Counter()
  for b in batches:
    real = b['mask'].reshape(-1) == 1
    images = _denormalize_image(b['images'].reshape(-1, SIZE, SIZE, 3))[real]
    for img, y in zip(images, b['labels'].reshape(-1)[real], strict=True):
      colour = tuple(int(v) for v in np.rint(img.reshape(-1, 3).mean(0)))
      seen[(colour, class_names[y])] += 1
  return seen


def test_classes_sorted_and_every_example_once_across_processes(tmp_path):
  truth = _flat_tree(tmp_path)
  cfg = _config(tmp_path)
  info = data.dataset_info(cfg)
  assert info.class_names == ('ant', 'bee', 'cat') and info.num_classes == 3
  assert info.num_examples == {'train': 15}
  expected = collections.Counter((c, name) for c, name in truth.items())
  for process_count in (1, 2, 4):
    steps = data.eval_steps(
      cfg, split='train', per_device_batch=2, local_devices=2, process_count=process_count
    )
    seen = collections.Counter()
    for p in range(process_count):
      batches = list(
        data.eval_iterator(
          cfg,
          split='train',
          per_device_batch=2,
          local_devices=2,
          process_index=p,
          process_count=process_count,
        )
      )
      assert len(batches) == steps
      seen += _recognise(batches, info.class_names)
    assert seen == expected, process_count


def test_odd_formats_decode_and_corrupt_files_are_skipped_with_a_warning(tmp_path, caplog):
  root = tmp_path / 'data'
  good = {
    'a/gray.jpg': dict(fmt='JPEG', mode='L'),
    'a/cmyk.jpg': dict(fmt='JPEG', mode='CMYK'),
    'a/rgba.png': dict(fmt='PNG', mode='RGBA'),
    'b/palette.gif': dict(fmt='GIF', mode='P'),
    'b/plain.bmp': dict(fmt='BMP'),
    'b/UPPER.JPEG': dict(fmt='JPEG'),
  }
  for i, (name, kw) in enumerate(good.items()):
    _save(str(root / name), i, **kw)
  # A truncated JPEG, a PNG cut in half, random bytes with an image extension, and
  # files that are not images at all (ignored, not counted as corrupt).
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(
    buf, 'JPEG'
  )
  (root / 'a' / 'truncated.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  buf = io.BytesIO()
  Image.new('RGB', (30, 30), (1, 2, 3)).save(buf, 'PNG')
  (root / 'b' / 'half.png').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  (root / 'b' / 'noise.jpg').write_bytes(os.urandom(500))
  (root / 'b' / 'notes.txt').write_text('not an image')
  (root / 'a' / '.DS_Store').write_bytes(b'\0' * 10)

  with caplog.at_level(logging.WARNING):
    info = data.dataset_info(_config(root))
  assert info.num_examples == {'train': len(good)}
  warning = ' '.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert 'Skipping 3 of 9 images' in warning
  for bad in ('truncated.jpg', 'half.png', 'noise.jpg'):
    assert bad in warning
  assert 'notes.txt' not in warning

  # Every surviving file decodes to its RGB colour (grayscale and CMYK through their
  # own colour conversions, so within a few levels; alpha dropped).
  batches = list(
    data.eval_iterator(_config(root), split='train', per_device_batch=8, local_devices=1)
  )
  seen = _recognise(batches, info.class_names)
  assert sum(seen.values()) == len(good)
  pil_colours = []
  for name in good:
    with Image.open(root / name) as im:
      pil_colours.append(np.asarray(im.convert('RGB'), np.float32).reshape(-1, 3).mean(0))
  for (colour, _), _n in seen.items():
    assert min(np.abs(np.array(colour) - c).max() for c in pil_colours) <= 3

  with pytest.raises(ValueError, match=r'3 of 9 images .* do not decode.*truncated\.jpg'):
    data.dataset_info(_config(root, skip_corrupt=False))


def test_split_directories_and_holdout(tmp_path):
  _flat_tree(tmp_path / 'train')
  _flat_tree(tmp_path / 'val', per_class=(1, 2), names=('bee', 'cat'))
  info = data.dataset_info(_config(tmp_path))
  assert info.num_examples == {'train': 15, 'val': 3}
  assert info.class_names == ('ant', 'bee', 'cat')
  b = next(data.eval_iterator(_config(tmp_path), split='val', per_device_batch=4, local_devices=1))
  labels = zip(b['labels'][0], b['mask'][0], strict=True)
  assert sorted(info.class_names[y] for y, m in labels if m) == ['bee', 'cat', 'cat']
  with pytest.raises(ValueError, match=r"Unknown split 'test'.*train, val"):
    next(data.eval_iterator(_config(tmp_path), split='test', per_device_batch=4, local_devices=1))

  _flat_tree(tmp_path / 'test', per_class=(1,), names=('dog',))
  with pytest.raises(ValueError, match=r"'test'.*classes that 'train' lacks: \['dog'\]"):
    data.dataset_info(_config(tmp_path))

  flat = tmp_path / 'flat'
  _flat_tree(flat, per_class=(40, 40, 40))
  a = folder.load_index(str(flat), 0.25)
  folder._INDEX_CACHE.clear()
  b = folder.load_index(str(flat), 0.25)
  assert a.files == b.files  # stable
  held, train = set(a.files['holdout']), set(a.files['train'])
  assert not held & train and len(held) + len(train) == 120
  assert 15 <= len(held) <= 45  # ~25% of 120 by hash
  with pytest.raises(ValueError, match='holdout_fraction'):
    folder.load_index(str(flat), 1.5)


def test_bad_folder_configs(tmp_path):
  with pytest.raises(ValueError, match='needs data.folder'):
    data.dataset_info(_config(''))
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    data.dataset_info(_config(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no class directories'):
    data.dataset_info(_config(tmp_path / 'empty'))


def test_eval_image_is_reachable_from_the_package_and_matches_the_pipeline(tmp_path):
  import nfnet_jax  # pylint: disable=g-import-not-at-top

  _flat_tree(tmp_path, per_class=(1,), names=('only',))
  path = next((tmp_path / 'only').iterdir())
  image = nfnet_jax.data.eval_image(path.read_bytes(), SIZE)
  assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
  batch = next(
    data.eval_iterator(_config(tmp_path), split='train', per_device_batch=1, local_devices=1)
  )
  # The same ops; graph rewrites may reorder the normalisation's float math by an ulp.
  np.testing.assert_allclose(batch['images'][0, 0], image, rtol=0, atol=1e-6)
