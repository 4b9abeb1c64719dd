"""Learning curves of training runs, from their workdirs' metrics.jsonl, to a PNG.

  python -m nfnet_jax.plot WORKDIR                      # -> WORKDIR/curves.png
  python -m nfnet_jax.plot WORKDIR... --out FILE.png    # several runs on one figure
  nfnet-plot WORKDIR [WORKDIR...] [--out FILE.png]

One panel per quantity against the training step: the loss and the top-1 accuracy (the
training batches' as lines, every evaluation, raw and EMA parameters, as markers), the
learning rate and the fraction of AGC units clipped. Each run has its own colour and is
named in the legend by its workdir's name. A quantity no run logged (no AGC in the
NF-RegNet recipe, no evaluation yet) is left out; non-finite values leave gaps. With one
workdir the figure goes to WORKDIR/curves.png unless --out; several need --out. Workdirs
and --out may be local or gs:// paths; the file is written atomically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from typing import Optional, Sequence

from absl import flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nfnet_jax import cli, fileio, metrics

__all__ = ['Panel', 'PANELS', 'DEFAULT_FILENAME', 'load_run', 'plot_runs', 'main']

DEFAULT_FILENAME = 'curves.png'


@dataclasses.dataclass(frozen=True)
class Panel:
  """One quantity: `key` is the training step's metric (steps.make_train_step); with
  `with_eval`, the evaluations' `<prefix><key>` and `<prefix>ema_<key>` share its panel,
  for every prefix train.eval_metric_prefix gives (`eval_`, `eval_imagenet_v2/`, ...)."""

  key: str
  ylabel: str
  with_eval: bool = False


PANELS = (
  Panel('loss', 'loss (cross-entropy)', with_eval=True),
  Panel('top1', 'top-1 accuracy', with_eval=True),
  Panel('learning_rate', 'learning rate'),
  Panel('agc_clip_fraction', 'AGC clip fraction'),
)


def run_name(workdir: str) -> str:
  """The legend's name of a run: the workdir's last path component."""
  name = os.path.basename(str(workdir).rstrip('/'))
  if fileio.is_remote(workdir):
    return name or str(workdir)
  return os.path.basename(os.path.abspath(workdir))


def load_run(workdir: str) -> list[dict]:
  """The records of `workdir`'s metrics.jsonl (metrics.read_metrics); a missing file or a
  damaged record is a one-line error naming the file and the fix."""
  path = os.path.join(str(workdir), metrics.METRICS_FILENAME)
  if not fileio.exists(path):
    raise FileNotFoundError(
      f'{path} does not exist: pass the --workdir of a training run '
      '(nfnet-train writes metrics.jsonl there from its first step).'
    )
  try:
    records = metrics.read_metrics(path)
  except json.JSONDecodeError:
    lines = fileio.read_text(path).splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.strip() and not _parses(line))
    raise ValueError(
      f'{path}: line {number} is not a JSON record: delete or repair that line (a trainer '
      'that is still running drops a half-written last line when it restarts).'
    ) from None
  for number, record in enumerate(records, 1):
    if not isinstance(record, dict) or not isinstance(record.get('step'), int):
      raise ValueError(
        f'{path}: record {number} has no integer "step": this is not a metrics.jsonl '
        'that nfnet-train wrote; delete or repair that record.'
      )
  return records


def _parses(line: str) -> bool:
  try:
    json.loads(line)
  except json.JSONDecodeError:
    return False
  return True


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records that hold `key`; non-finite values become NaN (gaps)."""
  steps, values = [], []
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      steps.append(record['step'])
      values.append(float(value) if math.isfinite(value) else math.nan)
  return steps, values


def _eval_split_and_ema(key: str, metric: str) -> Optional[tuple[str, bool]]:
  """For an evaluation key of `metric`: (its prefix, whether of the EMA parameters), e.g.
  `eval_ema_top1` -> ('eval_', True), `eval_imagenet_v2/top1` -> ('eval_imagenet_v2/',
  False); None for any other key."""
  if not key.startswith('eval_'):
    return None
  prefix = key[: key.index('/') + 1] if '/' in key else 'eval_'
  name = key[len(prefix) :]
  if name in (metric, 'ema_' + metric):
    return prefix, name != metric
  return None


def _eval_keys(records: list[dict], key: str) -> list[str]:
  """The evaluation keys of a quantity (`eval_top1`, `eval_ema_top1`, ...), in the order
  the records first hold them."""
  found = {}
  for record in records:
    for k in record:
      if _eval_split_and_ema(k, key):
        found.setdefault(k, None)
  return list(found)


def plot_runs(workdirs: Sequence[str], names: Optional[Sequence[str]] = None) -> Figure:
  """The figure of `workdirs`' learning curves: one panel per quantity of `PANELS` that
  any run logged (axes in that order), one colour per run, legend entries
  `<run name> <metric key>`. `names` overrides the runs' names (default: `run_name`)."""
  if not workdirs:
    raise ValueError('no workdir given: pass the --workdir of one or more training runs.')
  names = [run_name(w) for w in workdirs] if names is None else list(names)
  runs = [load_run(w) for w in workdirs]
  drawn = []
  for panel in PANELS:
    per_run = []
    for records in runs:
      keys = [panel.key] + (_eval_keys(records, panel.key) if panel.with_eval else [])
      series = [(k, *_series(records, k)) for k in keys]
      per_run.append([s for s in series if s[1]])
    if any(per_run):
      drawn.append((panel, per_run))
  if not drawn:
    wanted = ', '.join(p.key for p in PANELS)
    raise ValueError(
      f'no {wanted} in the metrics.jsonl of {", ".join(map(str, workdirs))}: '
      'plot again once the run has logged its first training step.'
    )

  cols = 1 if len(drawn) == 1 else 2
  rows = math.ceil(len(drawn) / cols)
  fig = Figure(figsize=(5.2 * cols, 3.4 * rows), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  colours = [f'C{i % 10}' for i in range(len(runs))]
  markers = 'osD^v<>ph'  # one per evaluation split (the headline one first)
  for i, (panel, per_run) in enumerate(drawn):
    ax = fig.add_subplot(rows, cols, i + 1)
    for name, colour, series in zip(names, colours, per_run):
      evals = [_eval_split_and_ema(key, panel.key) for key, *_ in series if key != panel.key]
      prefixes = list(dict.fromkeys(prefix for prefix, _ in evals))
      for key, steps, values in series:
        if key == panel.key:  # the training batches: many points, a line
          ax.plot(steps, values, color=colour, linewidth=1.2, label=f'{name} {key}')
        else:  # evaluations: a few points, markers (open for the EMA parameters)
          prefix, ema = _eval_split_and_ema(key, panel.key)
          ax.plot(
            steps,
            values,
            color=colour,
            linestyle='--' if ema else ':',
            marker=markers[prefixes.index(prefix) % len(markers)],
            markerfacecolor='none' if ema else colour,
            markersize=5,
            label=f'{name} {key}',
          )
    ax.set_xlabel('step')
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
  return fig


def save(fig: Figure, out: str) -> str:
  """Writes `fig` as a PNG to `out` (local or gs://, atomically); returns the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  return fileio.atomic_write(out, lambda f: f.write(buffer.getvalue()))


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'out',
    None,
    f'PNG to write (default with one workdir: WORKDIR/{DEFAULT_FILENAME}; required with several)',
    flag_values=values,
  )


def _plot_cli(f: flags.FlagValues, positional: list[str]) -> int:
  if not positional:
    raise cli.UserError('expected one or more workdirs: python -m nfnet_jax.plot WORKDIR...')
  out = f.out
  if out is None:
    if len(positional) > 1:
      raise cli.UserError(
        f'{len(positional)} workdirs share one figure: name it with --out FILE.png'
      )
    out = os.path.join(positional[0], DEFAULT_FILENAME)
  if not out.lower().endswith('.png'):
    raise cli.UserError(f'--out={out} is not a .png path: name the figure FILE.png')
  fig = plot_runs(positional)
  path = save(fig, out)
  print(f'wrote {path}: {len(fig.axes)} panels, {len(positional)} run(s)')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`nfnet-plot WORKDIR... [--out FILE.png]`; returns the exit status (1 after one
  `error: ...` line)."""
  return cli.run(
    _plot_cli,
    define_flags,
    argv,
    user_errors=(cli.UserError, ValueError, OSError),
    takes_positional=True,
  )


if __name__ == '__main__':
  sys.exit(main())
