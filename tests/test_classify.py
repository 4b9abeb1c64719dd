"""nfnet-classify: images and folders in, top-k class names out.

The weights are a narrow F0 whose classifier weight is zero and whose bias is known, so
the expected ranking and probabilities follow analytically (logits = bias, whatever the
image): the test checks the plumbing (preprocessing, batching with padding, order, names,
JSON, errors) against arithmetic, not against the code under test.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from nfnet_jax import checkpoint, classify, data, models, weights

NARROW = dict(width=0.0625, group_size=8)
SIZE = 32


def _weights(tmp_path, num_classes, bias):
  config = ml_collections.ConfigDict(dict(name='NFNet', kwargs=dict(variant='F0', **NARROW)))
  model = models.build_model(config, num_classes)
  params = model.init(
    jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3), np.float32), is_training=False
  )
  params = jax.tree.map(np.asarray, params)
  params['NFNet/~/linear'] = {
    'w': np.zeros_like(params['NFNet/~/linear']['w']),
    'b': np.asarray(bias, np.float32),
  }
  path = str(tmp_path / 'weights.npz')
  weights.save_converted(params, path, 'F0')
  return path


def _images(root):
  os.makedirs(root / 'album' / 'sub')
  rng = np.random.default_rng(0)
  paths = [root / 'a.jpg', root / 'album' / 'b.png', root / 'album' / 'sub' / 'c.JPG']
  for p in paths:
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(
      p, 'JPEG' if p.suffix.lower() == '.jpg' else 'PNG'
    )
  (root / 'album' / 'notes.txt').write_text('ignored')
  (root / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  return [str(p) for p in paths], str(root / 'broken.jpg')


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_imagenet_names_ship_with_the_package():
  wnids, names = data.imagenet_classes()
  assert len(wnids) == len(set(wnids)) == len(names) == 1000
  # The label order of TFDS imagenet2012 (an independent copy of the WordNet ids).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=1):
    assert list(wnids) == list(
      data.dataset_info(
        ml_collections.ConfigDict({**data.default_data_config().to_dict(), 'name': 'imagenet2012'})
      ).class_names
    )
  assert names[0].startswith('tench') and names[207] == 'golden retriever'
  assert names[999].startswith('toilet tissue')


def test_cli_ranks_by_the_known_logits_with_padding_and_errors(tmp_path, capsys):
  bias = np.linspace(-3, 3, 1000)[np.random.default_rng(1).permutation(1000)]
  weights = _weights(tmp_path, 1000, bias)
  good, broken = _images(tmp_path / 'in')
  argv = [
    '--weights',
    weights,
    '--width',
    '0.0625',
    '--group-size',
    '8',
    '--image-size',
    str(SIZE),
    '--batch-size',
    '2',
    '--top-k',
    '3',
    '--json',
    good[0],
    str(tmp_path / 'in' / 'album'),
    broken,
  ]
  assert classify.main(argv) == 1  # one image failed: non-zero exit...
  results = json.loads(capsys.readouterr().out)
  assert [r['path'] for r in results] == [good[0], good[1], good[2], broken]
  names = classify.load_class_names(None)
  top = np.argsort(-bias)[:3]
  expected_p = _softmax(bias.astype(np.float64))[top]
  for r in results[:3]:  # ...but every good image was classified
    assert [p['label'] for p in r['predictions']] == top.tolist()
    assert [p['class'] for p in r['predictions']] == [names[c] for c in top]
    np.testing.assert_allclose([p['probability'] for p in r['predictions']], expected_p, rtol=1e-4)
  assert 'Cannot decode image' in results[3]['error']

  text_argv = [a for a in argv[:-1] if a != '--json'] + ['--top-k', '2']
  assert classify.main(text_argv) == 0  # text output, without the broken file
  text = capsys.readouterr().out
  assert f'1. {names[top[0]]}' in text and f'{100 * expected_p[0]:6.2f}%' in text


def test_cli_with_a_workdirs_class_index_and_clear_errors(tmp_path, capsys):
  workdir = tmp_path / 'run'
  checkpoint.check_and_write_class_index('folder', ('ant', 'bee', 'cat'), str(workdir))
  weights = _weights(tmp_path, 3, [0.0, 2.0, 1.0])
  good, _ = _images(tmp_path / 'in')
  base = [
    '--weights',
    weights,
    '--width',
    '0.0625',
    '--group-size',
    '8',
    '--image-size',
    str(SIZE),
    '--json',
  ]
  assert classify.main(base + ['--class-index', str(workdir), good[0]]) == 0
  (result,) = json.loads(capsys.readouterr().out)
  assert [p['class'] for p in result['predictions']] == ['bee', 'cat', 'ant']

  # 3-class weights with the 1000 ImageNet names: a shape error naming the classifier.
  assert classify.main(base + [good[0]]) == 1
  assert 'linear' in capsys.readouterr().err
  assert classify.main(base + ['--class-index', str(workdir), str(tmp_path / 'nope.jpg')]) == 1
  assert 'no such file' in capsys.readouterr().err


def test_find_images_recurses_and_sorts(tmp_path):
  good, broken = _images(tmp_path)
  assert classify.find_images([str(tmp_path)]) == sorted(good[:1] + [broken]) + good[1:]
  with pytest.raises(FileNotFoundError):
    classify.find_images([str(tmp_path / 'missing')])
