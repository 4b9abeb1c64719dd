"""`python -m nfnet_jax.benchmark --paper-table`: table 3's protocol over several models
(tiny sizes: the figures themselves are not checked, only where they go)."""

import csv

import pytest

from nfnet_jax import benchmark, published

TINY = [
  '--width=0.0625',
  '--image-size=16',
  '--batch-per-device=1',
  '--num-devices=1',
  '--num-classes=10',
  '--dtype=float32',
  '--steps=1',
  '--warmup=1',
  '--conv-impl=native',  # compiles fastest on CPU
]

# arXiv 2102.06171 table 3, train ms per step (TPUv3, V100), typed here from the paper.
TABLE3_F0 = (73.3, 56.7)
TABLE3_F1 = (158.5, 133.9)
TABLE3_B7 = (1397.0, 1753.3)


@pytest.mark.slow  # two NFNet train steps compiled: about a minute of CPU
def test_paper_table_writes_a_row_per_model_and_marks_the_one_that_fails(
  tmp_path, capsys, monkeypatch
):
  real = benchmark.paper_row_config

  def failing_for_b7(name):
    if name == 'EfficientNet-B7':
      raise RuntimeError('no room for this model\nsecond line')
    return real(name)

  # EfficientNet-B7 fails whatever the registry holds; the NFNets run for real.
  monkeypatch.setattr(benchmark, 'paper_row_config', failing_for_b7)
  out = tmp_path / 'table3.csv'
  argv = ['--paper-table', '--models=F0,EfficientNet-B7,F0+', *TINY, f'--csv={out}']
  assert benchmark.main(argv) == 0
  printed = capsys.readouterr().out

  rows = {row['model']: row for row in csv.DictReader(open(out))}
  assert list(rows) == ['F0', 'EfficientNet-B7', 'F0+']
  for column in ('model', 'image_size', 'batch_per_device', 'dtype', 'ms_per_step', 'img_per_s'):
    assert column in rows['F0']
  for name, figures in (('F0', TABLE3_F0), ('EfficientNet-B7', TABLE3_B7)):
    assert (float(rows[name]['paper_tpuv3_ms']), float(rows[name]['paper_v100_ms'])) == figures
  # Table 3 has no F0+ row.
  assert (rows['F0+']['paper_tpuv3_ms'], rows['F0+']['paper_v100_ms']) == ('', '')
  for name in ('F0', 'F0+'):
    row = rows[name]
    assert (row['image_size'], row['batch_per_device'], row['dtype'], row['error']) == (
      '16',
      '1',
      'float32',
      '',
    )
    ms = float(row['ms_per_step'])
    assert ms > 0 and float(row['img_per_s']) == pytest.approx(1000 / ms, abs=0.051)
    # The CPU backend reports no device memory: the automatic choice keeps remat off.
    assert row['remat'] == 'False' and row['remat_choice'].startswith('auto: no device memory')
  failed = rows['EfficientNet-B7']
  assert failed['ms_per_step'] == '' and failed['error'] == (
    'RuntimeError: no room for this model second line'
  )

  lines = printed.splitlines()
  assert lines[0].startswith('| model | px | batch/device | dtype | remat | ms/step |')
  (f0_line,) = [line for line in lines if line.startswith('| F0 |')]
  cells = [c.strip() for c in f0_line.strip('|').split('|')]
  # measured / paper, to 2 decimals, next to each of the paper's figures.
  ms = float(rows['F0']['ms_per_step'])
  assert cells[7:] == ['73.3', f'{ms / 73.3:.2f}', '56.7', f'{ms / 56.7:.2f}']
  (b7_line,) = [line for line in lines if line.startswith('| EfficientNet-B7 |')]
  assert 'failed: RuntimeError: no room for this model' in b7_line
  assert lines[-1] == (
    'F1 vs EfficientNet-B7 train-step speed-up: measured: n/a (F1 not in this run, '
    'EfficientNet-B7 failed); '
    'paper (table 3): 8.8x TPUv3, 13.1x V100.'
  )


def test_the_speedup_line_divides_the_measured_step_times():
  rows = [
    {'model': 'F1', 'ms_per_step': 20.0},
    {'model': 'EfficientNet-B7', 'ms_per_step': 130.0},
  ]
  assert benchmark.speedup_line(rows).startswith(
    'F1 vs EfficientNet-B7 train-step speed-up: measured: 6.5x (130.0 / 20.0 ms); '
  )
  assert 'measured: n/a (F1 not in this run)' in benchmark.speedup_line(rows[1:])


def test_the_headline_speedups_follow_from_table_3():
  # The paper's abstract rounds to "8.7x"; table 3's figures give 1397.0 / 158.5 and
  # 1753.3 / 133.9.
  speedups = published.headline_speedups()
  assert round(speedups['tpuv3'], 1) == 8.8 and round(speedups['v100'], 1) == 13.1
  assert speedups['tpuv3'] == TABLE3_B7[0] / TABLE3_F1[0]


def test_the_default_table_is_table_3_with_f6_and_sam_rows():
  assert benchmark.PAPER_MODELS == (
    'F0',
    'F1',
    'F2',
    'F3',
    'F4',
    'F5',
    'F6',
    'F5+SAM',
    'F6+SAM',
    'EfficientNet-B0',
    'EfficientNet-B3',
    'EfficientNet-B4',
    'EfficientNet-B5',
    'EfficientNet-B6',
    'EfficientNet-B7',
    'BN-ResNet50',
  )
  sam = benchmark.paper_row_config('F5+SAM')
  plain = benchmark.paper_row_config('F5')
  assert sam.optimizer.sam_rho > 0 and plain.optimizer.sam_rho == 0
  assert benchmark.paper_row_config('F6').optimizer.sam_rho == 0
  # Each model at its own train size (arXiv 2102.06171 table 1: F0 192 px, F5 416 px).
  assert (plain.data.image_size, benchmark.paper_row_config('F0').data.image_size) == (416, 192)


def test_an_unknown_model_is_a_one_line_error_listing_the_valid_names(capsys):
  assert benchmark.main(['--paper-table', '--models=F0,F9']) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith('error: Unknown model(s) F9 in --models; valid: ')
  assert 'F5+SAM' in err and 'NF-RegNet-B0' in err and 'BN-ResNet50' in err
