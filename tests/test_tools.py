"""The benchmark tools, run as a user runs them (tiny sizes: figures are not checked)."""

import csv
import os

import pytest

from nfnet_jax import benchmark, throughput
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.kwargs.width=0.0625', '--config.model.kwargs.group_size=8']


def test_benchmark_times_the_step_a_config_describes(tmp_path, capsys):
  """--config and its --config.x overrides pick the model; dashed flags work; --csv."""
  out = tmp_path / 'latency.csv'
  config = os.path.join(REPO, 'experiments', 'nf_regnet.py') + ':B0'
  argv = [
    f'--config={config}',
    '--config.model.kwargs.width=0.25',
    '--image-size=32',
    '--batch-per-device=2',
    '--num-devices=2',
    '--dtype=float32',
    '--steps=2',
    '--warmup=1',
    f'--csv={out}',
  ]
  assert benchmark.main(argv) == 0
  line = capsys.readouterr().out
  assert line.startswith('NF-RegNet-B0 train: batch 2/device x 2 ') and 'ms/step' in line
  (row,) = list(csv.DictReader(open(out)))
  assert (row['variant'], row['width'], row['image_size'], row['devices']) == (
    'NF-RegNet-B0',
    '0.25',
    '32',
    '2',
  )
  assert float(row['ms_per_step']) > 0 and float(row['images_per_sec']) > 0


def test_benchmark_without_config_uses_the_variants_imagenet_recipe(capsys):
  argv = list(helpers.TINY_BENCHMARK_FLAGS)
  assert benchmark.main(argv) == 0
  assert capsys.readouterr().out.startswith('F0 eval: batch 1/device x 1 ')
  assert benchmark.main(['--variant=F9']) == 1
  assert 'Unknown variant' in capsys.readouterr().err


@pytest.mark.slow
def test_throughput_compares_the_pipelines_on_a_generated_corpus(tmp_path, capsys):
  config = os.path.join(REPO, 'experiments', 'nfnet.py') + ':F0'
  argv = [
    f'--config={config}',
    '--config.data.image_size=64',
    '--config.data.eval_image_size=64',
    '--images=8',
    '--batch=4',
    '--batches=1',
    '--rounds=1',
    '--threads=1',
  ]
  assert throughput.main(argv) == 0
  out = capsys.readouterr().out
  assert 'train' in out and 'eval' in out and 'PIL' in out
