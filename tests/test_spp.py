"""Signal-propagation plots (nfnet_jax.spp; arXiv 2101.08692 section 2 and figure 1): the
NF-ResNet statistics against the paper's analytic prediction, the batch-normalised
baseline's shape, and the CSV/PNG the tool writes."""

import csv
import math

import matplotlib.image
import numpy as np
import pytest

from nfnet_jax import spp
from tests.helpers import NF_RESNET_DEPTHS


def tap_fraction(side: int, stride: int) -> float:
  """The average fraction of a 3x3 SAME conv's taps that land inside a side x side map
  (zero padding supplies the rest), over the output positions of one axis, squared."""
  out = math.ceil(side / stride)
  pad_before = max((out - 1) * stride + 3 - side, 0) // 2
  inside = sum(0 <= i * stride - pad_before + k < side for i in range(out) for k in range(3))
  return (inside / (3 * out)) ** 2


def nf_resnet_prediction(depths, image_size: int, alpha: float):
  """(residual branch variance, block output variance) per block, from 2101.08692 section 4.

  Scaled-WS convs and gamma-scaled ReLUs keep a branch's variance, except that a 3x3 conv
  sums only the taps inside the map. A block adds alpha^2 times its branch's variance to the
  stream. A stage's first block restarts the stream with a WS conv of its input scaled by
  beta = 1 / sqrt(1 + alpha^2 x the previous stage's depth), the variance the recurrence
  expects without padding: 1 unless padding made the previous stage fall short. Branches
  see such normalised inputs too, so their variance is the 3x3 conv's tap fraction.
  """
  side = math.ceil(math.ceil(image_size / 2) / 2)  # stride-2 stem conv, stride-2 max-pool
  branches, outputs = [], []
  for stage, depth in enumerate(depths):
    for j in range(depth):
      stride = 2 if stage and not j else 1
      f = tap_fraction(side, stride)
      side = math.ceil(side / stride)
      if j:
        shortcut = outputs[-1]
      else:  # after the stem's max-pool, beta = 1 and the WS conv restores unit variance
        shortcut = outputs[-1] / (1 + alpha**2 * depths[stage - 1]) if stage else 1.0
      var = shortcut + alpha**2 * f
      branches.append(f)
      outputs.append(var)
  return branches, outputs


def test_tap_fraction_by_hand():
  assert tap_fraction(1, 1) == pytest.approx(1 / 9)  # the centre tap only
  assert tap_fraction(2, 1) == pytest.approx((4 / 6) ** 2)  # 2 of 3 taps per axis
  assert tap_fraction(4, 2) == pytest.approx((5 / 6) ** 2)  # SAME pads the end only
  assert tap_fraction(10_000, 1) > 0.999


def test_nf_resnet_statistics_follow_the_analytic_prediction():
  """Unit-order residual branches; the variance grows by alpha^2 per block within a stage
  and restarts at 1 + alpha^2 at each transition (alpha = 0.5 to make the growth plain)."""
  alpha, size = 0.5, 64
  rows = spp.measure('NF-ResNet50', batch=8, image_size=size, width=1, alpha=alpha)
  depths = NF_RESNET_DEPTHS['ResNet50']
  branches, outputs = nf_resnet_prediction(depths, size, alpha)
  assert [r['block'] for r in rows] == list(range(sum(depths)))
  assert {r['model'] for r in rows} == {'NF-ResNet50'}
  res = np.array([r['res_avg_var'] for r in rows])
  var = np.array([r['avg_var'] for r in rows])
  # Tolerances for random weights at width 1 (bottlenecks of 16 to 128 channels): the
  # first three stages, on maps of 16, 8 and 4 pixels, come within 7% over seeds 0-2. The
  # last stage's 2x2 maps give each channel 8 images x 4 strongly correlated pixels, and
  # the (biased) sample variance falls short by up to 1/8 more.
  last = sum(depths[:-1])
  np.testing.assert_allclose(res, branches, rtol=0.3)
  np.testing.assert_allclose(var[:last], outputs[:last], rtol=0.1)
  np.testing.assert_allclose(var[last:], outputs[last:], rtol=0.25)
  start = 0
  for depth in depths:  # growth within each stage, a restart at each transition
    assert np.all(np.diff(var[start : start + depth]) > 0.5 * alpha**2 * min(branches))
    assert start == 0 or var[start] < var[start - 1]
    start += depth
  # The NF blocks keep the channel means small (2101.08692, figure 2: squared means well
  # below the variances), unlike the BN-ReLU network's.
  assert max(r['avg_sq_mean'] for r in rows) < 0.1


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_cli_writes_what_it_measured(tmp_path, capsys, monkeypatch):
  """One run of the tool on both families (its CSV equals `measure_models`' statistics),
  whose rows then show SkipInit's switched-off NF branches and the BN-ReLU baseline's
  growth (2101.08692, figure 1)."""
  returned = {}

  def recording(*args, **kwargs):
    returned.update(measure_models(*args, **kwargs))
    return returned

  measure_models = spp.measure_models
  monkeypatch.setattr(spp, 'measure_models', recording)
  argv = ['--models', 'NF-ResNet50,BN-ResNet50', '--width', '0.25', '--out', str(tmp_path)]
  argv += ['--batch', '4', '--image-size', '64', '--seed', '3', '--skip-gain', '0']
  assert spp.main(argv) == 0
  assert 'spp.csv' in capsys.readouterr().out
  rows = read_csv(tmp_path / 'spp.csv')
  assert list(rows[0]) == ['model', 'block', 'avg_sq_mean', 'avg_var', 'res_avg_var']
  want = [r for model_rows in returned.values() for r in model_rows]
  assert len(rows) == len(want) == 32
  for got, row in zip(rows, want):
    assert got['model'] == row['model'] and int(got['block']) == row['block']
    for stat in spp.STATS:
      assert float(got[stat]) == row[stat]  # repr reads back exactly
  image = matplotlib.image.imread(tmp_path / 'spp.png')
  assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100

  starts = np.cumsum([0] + NF_RESNET_DEPTHS['ResNet50'][:-1])
  stages = list(zip(starts, NF_RESNET_DEPTHS['ResNet50']))
  # skip_gain 0: every NF block passes its shortcut on unchanged within a stage.
  nf = [r['avg_var'] for r in returned['NF-ResNet50']]
  for start, depth in stages:
    np.testing.assert_allclose(nf[start : start + depth], nf[start], rtol=1e-5)
  # BN-ReLU ResNet-V2: every branch starts from a batch-normalised input, so each block
  # adds about the same variance and the variance grows linearly within a stage; a
  # transition's projected shortcut starts it again.
  res = np.array([r['res_avg_var'] for r in returned['BN-ResNet50']])
  var = np.array([r['avg_var'] for r in returned['BN-ResNet50']])
  for start, depth in stages:
    np.testing.assert_allclose(
      np.diff(var[start : start + depth]), res[start + 1 : start + depth], rtol=0.3
    )
    if start:
      assert var[start] < var[start - 1]
  assert max(r['avg_sq_mean'] for r in returned['BN-ResNet50']) > 0.1


def test_plot_has_a_panel_per_statistic_and_a_line_per_model():
  results = {
    name: [
      {'model': name, 'block': b, 'avg_sq_mean': 1.0 + b, 'avg_var': 2.0 + b, 'res_avg_var': 3.0}
      for b in range(5)
    ]
    for name in ('A', 'B')
  }
  fig = spp.plot(results)
  assert len(fig.axes) == 3
  for ax, stat in zip(fig.axes, spp.STATS):
    assert ax.get_yscale() == 'log'
    assert ax.get_ylabel() == spp.LABELS[stat] and ax.get_xlabel() == 'residual block'
    lines = ax.get_lines()
    assert len(lines) == 2
    for line, name in zip(lines, results):
      assert line.get_label() == name
      np.testing.assert_array_equal(line.get_ydata(), [r[stat] for r in results[name]])
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ['A', 'B']


def test_unknown_model_is_one_line(tmp_path, capsys):
  assert spp.main(['--models', 'NF-ResNet50,ResNet51', '--out', str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith('error:') and "'ResNet51'" in err and 'BN-ResNet50' in err
  assert not list(tmp_path.iterdir())  # nothing measured or written
