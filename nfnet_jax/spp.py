r"""Signal-propagation plots (Brock, De, Smith 2021, arXiv 2101.08692, section 2 and figure 1).

    python -m nfnet_jax.spp --models NF-ResNet600,BN-ResNet600 --out DIR
    nfnet-spp --models NF-ResNet50,BN-ResNet50,F0 --out DIR --batch 8 --image-size 64

Builds each model of the registry (NF families and batch-normalised baselines alike) at
initialisation, feeds it one batch of N(0, 1) images and measures, after every residual
block: the average channel squared mean (the squared mean over batch and space of each
channel, averaged over channels), the average channel variance of the block's output, and
the average channel variance of its residual branch (before the NF families' skip_gain and
alpha). Writes DIR/spp.csv (`model, block, avg_sq_mean, avg_var, res_avg_var`) and DIR/spp.png
(one panel per statistic, one line per model, log y). `--width` sets every model's width
argument (`--width 1`: quarter-width ResNets, 16x cheaper).

Batch-normalised models normalise with the batch's statistics (training mode: what the first
step of training sees); the NF models run in evaluation mode, which at initialisation
differs from training only by stochastic depth and dropout. The NF families initialise
every skip_gain to 0 (SkipInit), which switches every residual branch off; the plots set it
to `--skip-gain` (default 1), the network the paper's analysis describes, so each block adds
alpha^2 to the variance. Zero padding makes a 3x3 conv see fewer inputs near the border, so
on small feature maps (the last stages at small image sizes) the branches' variance falls
below 1 by the fraction of taps that land inside the map. The defaults (200-block ResNet-600s
at 64 px, batch 8) run in a few minutes on a 2-core CPU, op by op (docs/spp.md).
"""

import csv
import io
import os
import sys
from typing import Mapping, Optional, Sequence

from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections

from nfnet_jax import cli, fileio, models

STATS = ('avg_sq_mean', 'avg_var', 'res_avg_var')
FIELDS = ('model', 'block') + STATS
# The panels' axis labels (the names of 2101.08692's figure 1).
LABELS = {
  'avg_sq_mean': 'average channel squared mean',
  'avg_var': 'average channel variance',
  'res_avg_var': 'residual branch average channel variance',
}
DEFAULT_MODELS = ('NF-ResNet600', 'BN-ResNet600')
DEFAULT_BATCH, DEFAULT_IMAGE_SIZE = 8, 64
CSV_NAME, PNG_NAME = 'spp.csv', 'spp.png'


def measure(
  model_name: str,
  batch: int = DEFAULT_BATCH,
  image_size: int = DEFAULT_IMAGE_SIZE,
  seed: int = 0,
  skip_gain: float = 1.0,
  **model_kwargs,
) -> list[dict]:
  """One row per residual block of `model_name` (any registry name) at initialisation:
  `{'model': canonical name, 'block': index, 'avg_sq_mean', 'avg_var', 'res_avg_var'}`.

  `model_kwargs` override the family's defaults (e.g. `width=0.25`); every `skip_gain`
  parameter is set to `skip_gain`. The same `seed` draws the same weights and inputs.
  """
  fam, key = models.resolve(model_name)
  name = fam.canonical_name(key)
  kwargs = {**fam.defaults, **model_kwargs, 'variant': name}
  config = ml_collections.ConfigDict(dict(name=fam.name, kwargs=kwargs))
  model = models.build_model_with_state(config, num_classes=10)
  is_training = fam.stateful  # batch statistics for BN; no stochastic depth for NF

  def set_skip_gain(module, name, value):
    del module
    return jnp.full_like(value, skip_gain) if name == 'skip_gain' else value

  # Op by op, not under jit: compiling a 200-block network as one XLA program takes longer
  # on a CPU than running it once.
  def stats(rng):
    init_rng, data_rng, apply_rng = jax.random.split(rng, 3)
    x = jax.random.normal(data_rng, (batch, image_size, image_size, 3), jnp.float32)
    params, state = model.init(init_rng, x, is_training)
    params = hk.data_structures.map(set_skip_gain, params)
    out, _ = model.apply(params, state, apply_rng, x, is_training, True)
    return {k: v for k, v in out.items() if k.startswith('block_')}

  blocks = jax.device_get(stats(jax.random.PRNGKey(seed)))
  return [
    {'model': name, 'block': i, **{s: float(blocks[f'block_{i}'][s]) for s in STATS}}
    for i in range(len(blocks))
  ]


def measure_models(names: Sequence[str], **kwargs) -> dict[str, list[dict]]:
  """`measure` for each name (all resolved first, so a typo fails before any work),
  keyed by canonical name."""
  names = [n.strip() for n in names if n.strip()]
  if not names:
    raise ValueError('no model given: pass --models NAME[,NAME...], e.g. NF-ResNet50,BN-ResNet50')
  for name in names:
    models.resolve(name)
  results = {}
  for name in names:
    rows = measure(name, **kwargs)
    results[rows[0]['model']] = rows
  return results


def csv_text(results: Mapping[str, list[dict]]) -> str:
  """The CSV of `results` (floats as `repr`, which reads back exactly)."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator='\n')
  writer.writeheader()
  for rows in results.values():
    writer.writerows({**row, **{s: repr(row[s]) for s in STATS}} for row in rows)
  return buffer.getvalue()


def plot(results: Mapping[str, list[dict]], title: Optional[str] = None) -> Figure:
  """One panel per statistic against the block index, one line per model, log y."""
  fig = Figure(figsize=(13.5, 3.6), dpi=80, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(STATS))
  for ax, stat in zip(axes, STATS):
    for i, (name, rows) in enumerate(results.items()):
      ax.plot(
        [r['block'] for r in rows],
        [r[stat] for r in rows],
        color=f'C{i % 10}',
        linewidth=1.4,
        label=name,
      )
    ax.set_yscale('log')
    ax.set_xlabel('residual block')
    ax.set_ylabel(LABELS[stat])
    ax.grid(True, which='both', alpha=0.3)
  axes[0].legend(fontsize='small')
  if title:
    fig.suptitle(title, fontsize='medium')
  return fig


def write(results: Mapping[str, list[dict]], out: str, title: Optional[str] = None) -> tuple:
  """Writes OUT/spp.csv and OUT/spp.png (local or gs://, atomically); returns their paths."""
  csv_path = fileio.atomic_write_text(os.path.join(out, CSV_NAME), csv_text(results))
  buffer = io.BytesIO()
  plot(results, title).savefig(buffer, format='png')
  png_path = fileio.atomic_write(os.path.join(out, PNG_NAME), lambda f: f.write(buffer.getvalue()))
  return csv_path, png_path


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_list(
    'models', list(DEFAULT_MODELS), 'Registry model names, comma-separated.', flag_values=values
  )
  flags.DEFINE_string('out', None, 'Directory for spp.csv and spp.png.', flag_values=values)
  flags.DEFINE_integer('batch', DEFAULT_BATCH, 'Images in the N(0, 1) batch.', flag_values=values)
  flags.DEFINE_integer(
    'image_size', DEFAULT_IMAGE_SIZE, 'Image side in pixels.', flag_values=values
  )
  flags.DEFINE_integer('seed', 0, 'Draws the weights and the inputs.', flag_values=values)
  flags.DEFINE_float(
    'width',
    0.0,
    "Every model's `width` argument (e.g. 1 for quarter-width ResNets); 0: each family's own.",
    flag_values=values,
  )
  flags.DEFINE_float(
    'skip_gain', 1.0, "The NF blocks' skip_gain (SkipInit initialises it to 0).", flag_values=values
  )
  flags.mark_flag_as_required('out', flag_values=values)


def _spp_cli(f: flags.FlagValues, positional: list[str]) -> int:
  del positional  # cli.run refuses positional arguments
  for flag in ('batch', 'image_size'):
    if f[flag].value < 1:
      raise cli.UserError(f'--{flag.replace("_", "-")}={f[flag].value}: give a positive number')
  widths = dict(width=f.width) if f.width else {}
  results = measure_models(
    f.models,
    batch=f.batch,
    image_size=f.image_size,
    seed=f.seed,
    skip_gain=f.skip_gain,
    **widths,
  )
  title = (
    f'Signal propagation at initialisation: N(0, 1) inputs, batch {f.batch}, '
    f'{f.image_size}x{f.image_size} px, seed {f.seed}' + (f', width {f.width:g}' if f.width else '')
  )
  for path in write(results, f.out, title):
    print(f'wrote {path}')
  for name, rows in results.items():
    last = rows[-1]
    print(
      f'{name}: {len(rows)} blocks; last block avg_sq_mean {last["avg_sq_mean"]:.4g}, '
      f'avg_var {last["avg_var"]:.4g}, res_avg_var {last["res_avg_var"]:.4g}'
    )
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`nfnet-spp --models A,B --out DIR`; returns the exit status (1 after one `error:` line)."""
  return cli.run(_spp_cli, define_flags, argv, user_errors=(cli.UserError, ValueError))


if __name__ == '__main__':
  sys.exit(main())
