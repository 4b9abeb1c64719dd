"""Tests for nfnet_jax.plot: the figure's data are the records MetricsLogger wrote."""

import importlib
import math
import os
import runpy
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import setuptools

from nfnet_jax import plot
from nfnet_jax.metrics import METRICS_FILENAME, MetricsLogger


def write_run(workdir, steps=20, eval_every=10, clipping=True, seed=0):
  """A run's metrics.jsonl as the trainer writes it: a step-0 record, training records
  every other step, evaluations of raw and EMA parameters. Returns the records written."""
  rng = np.random.default_rng(seed)
  written = [(0, {'num_params': 1234, 'num_devices': 8, 'total_steps': steps})]
  for step in range(1, steps + 1):
    if step % 2 == 0 or step == 1:
      train = {
        'loss': np.float32(rng.uniform(0.5, 2.5)),
        'top1': np.float32(rng.uniform(0, 1)),
        'learning_rate': np.float32(0.1 * step / steps),
        'grad_norm': np.float32(rng.uniform(1, 2)),
      }
      if clipping:
        train['agc_clip_fraction'] = np.float32(rng.uniform(0, 0.5))
      written.append((step, train))
    if step % eval_every == 0:
      ev = {}
      for prefix in ('eval_', 'eval_ema_'):
        ev[prefix + 'loss'] = rng.uniform(0.5, 2)
        ev[prefix + 'top1'] = rng.uniform(0, 1)
        ev[prefix + 'top5'] = rng.uniform(0, 1)
      ev['eval_count'] = 360
      written.append((step, ev))
  with MetricsLogger(str(workdir), total_steps=steps, tensorboard=False, progress_bar=False) as log:
    for step, values in written:
      log.write(step, values)
  return written


def expected(written, key):
  """(steps, values) of `key` in the records, as float32 went in (independent of plot)."""
  pairs = [(s, float(v[key])) for s, v in written if key in v]
  return [s for s, _ in pairs], [v for _, v in pairs]


def lines_by_label(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def test_one_run_png_written_and_valid(tmp_path):
  wd = tmp_path / 'digits'
  write_run(wd)
  assert plot.main([str(wd)]) == 0
  out = wd / plot.DEFAULT_FILENAME
  with Image.open(out) as image:
    image.verify()
  with Image.open(out) as image:
    assert image.format == 'PNG'
    # Four panels on a 2x2 grid of 5.2 x 3.4 inches each at 100 dpi.
    assert image.size == (1040, 680)
  assert os.path.getsize(out) < 150_000


def test_plotted_data_equal_the_records(tmp_path):
  wd = tmp_path / 'run_a'
  written = write_run(wd)
  fig = plot.plot_runs([str(wd)])
  axes = {ax.get_ylabel(): ax for ax in fig.axes}
  assert list(axes) == [p.ylabel for p in plot.PANELS]
  for panel in plot.PANELS:
    ax = axes[panel.ylabel]
    assert ax.get_xlabel() == 'step'
    keys = [panel.key] + ([f'eval_{panel.key}', f'eval_ema_{panel.key}'] if panel.with_eval else [])
    lines = lines_by_label(ax)
    assert sorted(lines) == sorted(f'run_a {k}' for k in keys)
    for key in keys:
      steps, values = expected(written, key)
      line = lines[f'run_a {key}']
      np.testing.assert_array_equal(line.get_xdata(), steps)
      # float32 in, JSON float64 out: equal to float32 precision.
      np.testing.assert_allclose(line.get_ydata(), values, rtol=1e-7)
  # Metrics without a panel (grad_norm, top5, count, num_params) are not drawn.
  labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
  assert not any(k in label for label in labels for k in ('grad_norm', 'top5', 'count'))


def test_several_runs_one_figure_with_legend(tmp_path):
  a, b = tmp_path / 'nfnet_f0', tmp_path / 'nf_regnet'
  written_a = write_run(a, seed=1)
  written_b = write_run(b, steps=30, clipping=False, seed=2)
  fig = plot.plot_runs([str(a), str(b)])
  axes = {ax.get_ylabel(): ax for ax in fig.axes}
  loss = axes['loss (cross-entropy)']
  legend = [t.get_text() for t in loss.get_legend().get_texts()]
  assert legend == [
    'nfnet_f0 loss',
    'nfnet_f0 eval_loss',
    'nfnet_f0 eval_ema_loss',
    'nf_regnet loss',
    'nf_regnet eval_loss',
    'nf_regnet eval_ema_loss',
  ]
  lines = lines_by_label(loss)
  assert lines['nfnet_f0 loss'].get_color() != lines['nf_regnet loss'].get_color()
  np.testing.assert_array_equal(lines['nf_regnet loss'].get_xdata(), expected(written_b, 'loss')[0])
  # Only the first run used AGC: its panel holds that run alone.
  clip = lines_by_label(axes['AGC clip fraction'])
  assert list(clip) == ['nfnet_f0 agc_clip_fraction']
  np.testing.assert_allclose(
    clip['nfnet_f0 agc_clip_fraction'].get_ydata(),
    expected(written_a, 'agc_clip_fraction')[1],
    rtol=1e-7,
  )

  out = tmp_path / 'both.png'
  assert plot.main([str(a), str(b), '--out', str(out)]) == 0
  with Image.open(out) as image:
    assert image.format == 'PNG' and image.size == (1040, 680)


def test_further_evaluation_splits_share_the_panels(tmp_path):
  wd = tmp_path / 'splits'
  with MetricsLogger(str(wd), total_steps=4, tensorboard=False, progress_bar=False) as log:
    log.write(2, {'loss': 2.0, 'top1': 0.1})
    log.write(4, {'loss': 1.0, 'top1': 0.3})
    # The headline split, then a further one under its own prefix (train.evaluate_splits).
    log.write(
      4,
      {
        'eval_top1': 0.5,
        'eval_ema_top1': 0.6,
        'eval_imagenet_v2/top1': 0.4,
        'eval_imagenet_v2/ema_top1': 0.45,
        'eval_imagenet_v2/top5': 0.7,
      },
    )
  fig = plot.plot_runs([str(wd)])
  top1 = {ax.get_ylabel(): ax for ax in fig.axes}['top-1 accuracy']
  lines = lines_by_label(top1)
  assert {k: list(v.get_ydata()) for k, v in lines.items()} == {
    'splits top1': [0.1, 0.3],
    'splits eval_top1': [0.5],
    'splits eval_ema_top1': [0.6],
    'splits eval_imagenet_v2/top1': [0.4],
    'splits eval_imagenet_v2/ema_top1': [0.45],
  }
  # One marker per split, open for the EMA parameters.
  assert lines['splits eval_top1'].get_marker() == lines['splits eval_ema_top1'].get_marker()
  assert (
    lines['splits eval_top1'].get_marker() != lines['splits eval_imagenet_v2/top1'].get_marker()
  )
  assert lines['splits eval_ema_top1'].get_markerfacecolor() == 'none'


def test_missing_quantities_are_skipped(tmp_path):
  wd = tmp_path / 'early'
  # A run stopped before its first evaluation, without AGC, and with a diverged step.
  with MetricsLogger(str(wd), total_steps=9, tensorboard=False, progress_bar=False) as log:
    log.write(1, {'loss': 2.0, 'learning_rate': 0.0})
    log.write(2, {'loss': math.inf, 'learning_rate': 0.05})
    log.write(3, {'loss': 1.0, 'learning_rate': 0.1})
  fig = plot.plot_runs([str(wd)])
  assert [ax.get_ylabel() for ax in fig.axes] == ['loss (cross-entropy)', 'learning rate']
  (line,) = fig.axes[0].get_lines()
  np.testing.assert_array_equal(line.get_ydata(), [2.0, np.nan, 1.0])  # a gap, not inf
  out = tmp_path / 'early.png'
  assert plot.main([str(wd), '--out', str(out)]) == 0
  with Image.open(out) as image:
    assert image.size == (1040, 340)  # two panels side by side


def test_no_metrics_file(tmp_path, capsys):
  assert plot.main([str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0
  assert os.path.join(str(tmp_path), METRICS_FILENAME) in err and '--workdir' in err
  with pytest.raises(FileNotFoundError, match='metrics.jsonl does not exist'):
    plot.plot_runs([str(tmp_path)])


def test_damaged_record_names_file_and_line(tmp_path, capsys):
  wd = tmp_path / 'damaged'
  write_run(wd, steps=4, eval_every=4)
  path = wd / METRICS_FILENAME
  lines = path.read_text().splitlines()
  lines.insert(2, '{"step": 3, "loss": 1.')
  path.write_text('\n'.join(lines) + '\n')
  assert plot.main([str(wd)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0
  assert f'{path}: line 3 is not a JSON record' in err and 'delete or repair' in err
  assert not (wd / plot.DEFAULT_FILENAME).exists()


def test_record_without_step(tmp_path):
  wd = tmp_path / 'other'
  wd.mkdir()
  (wd / METRICS_FILENAME).write_text('{"loss": 1.0}\n')
  with pytest.raises(ValueError, match='record 1 has no integer "step"'):
    plot.plot_runs([str(wd)])


def test_nothing_to_plot(tmp_path):
  wd = tmp_path / 'started'
  with MetricsLogger(str(wd), total_steps=9, tensorboard=False, progress_bar=False) as log:
    log.write(0, {'num_params': 10})
  with pytest.raises(ValueError, match='once the run has logged its first training step'):
    plot.plot_runs([str(wd)])


def test_cli_usage_errors(tmp_path, capsys):
  a, b = tmp_path / 'a', tmp_path / 'b'
  write_run(a, steps=2)
  write_run(b, steps=2)
  assert plot.main([str(a), str(b)]) == 1
  assert 'name it with --out FILE.png' in capsys.readouterr().err
  assert plot.main([]) == 1
  assert 'expected one or more workdirs' in capsys.readouterr().err
  assert plot.main([str(a), '--out', str(tmp_path / 'x.jpg')]) == 1
  assert 'is not a .png path' in capsys.readouterr().err


def test_console_script_and_help(capsys):
  with mock.patch.object(setuptools, 'setup') as setup:
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'setup.py'))
  scripts = dict(s.split('=') for s in setup.call_args.kwargs['entry_points']['console_scripts'])
  module, function = scripts['nfnet-plot'].split(':')
  assert importlib.import_module(module) is plot and getattr(plot, function) is plot.main
  assert plot.main(['--help']) == 0
  out = capsys.readouterr().out
  assert 'python -m nfnet_jax.plot WORKDIR' in out and '--out' in out
