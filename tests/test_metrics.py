"""Tests for nfnet_jax.metrics."""

import glob
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.metrics import DISCARDED_FILENAME, MetricsLogger, read_metrics


def read_lines(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f.read().splitlines()]


def tb_scalars(tb_dir):
  """{tag: [(step, value), ...]} read back from the event files."""
  import tensorflow as tf

  out = {}
  plugins = set()
  for path in sorted(glob.glob(os.path.join(tb_dir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor'):
          v = float(tf.make_ndarray(value.tensor))
        else:
          v = value.simple_value
        out.setdefault(value.tag, []).append((event.step, v))
        if value.metadata.plugin_data.plugin_name:
          plugins.add(value.metadata.plugin_data.plugin_name)
  assert plugins == {'scalars'}
  return out


def test_jsonl_lines_parse_have_step_and_append_across_instances(tmp_path):
  wd = str(tmp_path)
  with MetricsLogger(wd, total_steps=10, tensorboard=False, progress_bar=False) as log:
    log.write(
      1,
      {
        'loss': np.float32(2.5),
        'top1': jnp.asarray(0.25),
        'count': np.int64(7),
        'lr': 0.1,
        'finite': np.bool_(True),
      },
    )
    log.write(2, {'loss': jnp.float32(2.0), 'step': 999})
  # Resumed run: a second logger appends, nothing is truncated.
  with MetricsLogger(wd, total_steps=10, tensorboard=False, progress_bar=False) as log:
    log.write(3, {'loss': 1.5})

  lines = read_lines(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in lines] == [1, 2, 3]
  assert all(list(r)[0] == 'step' for r in lines)  # 'step' first
  assert lines[0] == {'step': 1, 'loss': 2.5, 'top1': 0.25, 'count': 7, 'lr': 0.1, 'finite': True}
  assert type(lines[0]['count']) is int and type(lines[0]['loss']) is float
  assert lines[1] == {'step': 2, 'loss': 2.0}
  assert not os.path.exists(os.path.join(wd, 'tensorboard'))


def test_non_finite_values_keep_file_parseable(tmp_path):
  wd = str(tmp_path)
  with MetricsLogger(wd, total_steps=3, tensorboard=False, progress_bar=False) as log:
    log.write(1, {'loss': float('nan'), 'grad_norm': np.float32('inf'), 'x': -np.inf, 'ok': 1.0})
  with open(os.path.join(wd, 'metrics.jsonl'), encoding='utf-8') as f:
    text = f.read()
  record = json.loads(text)  # strict JSON: no NaN/Infinity literals
  assert record == {'step': 1, 'loss': 'nan', 'grad_norm': 'inf', 'x': '-inf', 'ok': 1.0}
  assert 'NaN' not in text and 'Infinity' not in text
  (back,) = read_metrics(wd)
  assert math.isnan(back['loss']) and back['grad_norm'] == math.inf
  assert back['x'] == -math.inf and back['ok'] == 1.0


def test_rejects_non_scalars(tmp_path):
  with MetricsLogger(str(tmp_path), total_steps=3, tensorboard=False, progress_bar=False) as log:
    with pytest.raises(ValueError, match="'v' must be a scalar"):
      log.write(1, {'v': np.ones(3)})
    with pytest.raises(TypeError, match="'s' must be numeric"):
      log.write(1, {'s': 'hello'})
    log.write(2, {'v': np.ones((1, 1))})
  assert read_lines(tmp_path / 'metrics.jsonl') == [{'step': 2, 'v': 1.0}]


def test_incomplete_last_line_from_crash_is_dropped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  with MetricsLogger(str(tmp_path), total_steps=3, tensorboard=False, progress_bar=False) as log:
    log.write(2, {'loss': 1.0})
  assert read_lines(path) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.0}]


def test_non_main_process_writes_nothing(tmp_path):
  wd = tmp_path / 'wd'
  log = MetricsLogger(str(wd), total_steps=5, is_main_process=False)
  assert not log.is_main_process
  log.write(1, {'loss': 1.0})
  log.progress(1, loss=1.0)
  log.flush()
  log.close()
  assert not wd.exists()


def test_default_main_process_is_process_zero(tmp_path):
  log = MetricsLogger(str(tmp_path), total_steps=5, tensorboard=False, progress_bar=False)
  assert log.is_main_process  # single process: jax.process_index() == 0
  log.close()


def test_tensorboard_scalars_written_and_readable(tmp_path):
  wd = str(tmp_path)
  log = MetricsLogger(wd, total_steps=10, progress_bar=False)
  log.write(5, {'train/loss': np.float32(1.25), 'train/top1': 0.5})
  log.write(10, {'train/loss': 0.75, 'bad': float('nan')})
  log.close()
  log.close()  # idempotent
  events = glob.glob(os.path.join(wd, 'tensorboard', 'events.out.tfevents.*'))
  assert events
  scalars = tb_scalars(os.path.join(wd, 'tensorboard'))
  assert scalars['train/loss'] == [(5, 1.25), (10, 0.75)]
  assert scalars['train/top1'] == [(5, 0.5)]
  assert len(scalars['bad']) == 1 and math.isnan(scalars['bad'][0][1])
  # JSONL alongside.
  assert [r['step'] for r in read_lines(os.path.join(wd, 'metrics.jsonl'))] == [5, 10]
  with pytest.raises(RuntimeError):
    log.write(11, {'loss': 1.0})


def test_remote_workdir_rewrites_whole_file(tmp_path):
  """Non-local paths go through tf.io.gfile (ram:// stands in for gs://)."""
  import tensorflow as tf

  wd = f'ram://metrics_test_{os.getpid()}/run'
  with MetricsLogger(wd, total_steps=4, tensorboard=False, progress_bar=False) as log:
    log.write(1, {'loss': 1.0})
  with MetricsLogger(wd, total_steps=4, tensorboard=False, progress_bar=False) as log:
    log.write(2, {'loss': float('inf')})
  text = tf.io.gfile.GFile(wd + '/metrics.jsonl').read()
  assert [json.loads(line) for line in text.splitlines()] == [
    {'step': 1, 'loss': 1.0},
    {'step': 2, 'loss': 'inf'},
  ]
  assert read_metrics(wd)[1]['loss'] == math.inf


def _log_steps(workdir, steps, **kwargs):
  with MetricsLogger(
    workdir, total_steps=20, tensorboard=False, progress_bar=False, **kwargs
  ) as log:
    for step in steps:
      log.write(step, {'loss': float(step)})
      if step % 4 == 0:
        log.write(step, {'eval_top1': 0.5})


@pytest.mark.parametrize('remote', [False, True])
def test_resume_sets_aside_records_of_work_that_was_not_checkpointed(tmp_path, remote):
  """Killed at step 7 after a checkpoint at step 4: steps 5-7 are redone, and the
  file keeps one record per step, in order; the first copies are kept aside."""
  workdir = f'ram://metrics_resume_{os.getpid()}/run' if remote else str(tmp_path)
  _log_steps(workdir, range(1, 8))
  _log_steps(workdir, range(5, 10), resume_step=4)
  records = read_metrics(workdir)
  assert [r['step'] for r in records if 'loss' in r] == list(range(1, 10))
  assert [r['step'] for r in records if 'eval_top1' in r] == [4, 8]
  aside = read_metrics(os.path.join(workdir, DISCARDED_FILENAME))
  assert [r['step'] for r in aside] == [5, 6, 7]
  # A resume with nothing to set aside leaves the file as it was.
  _log_steps(workdir, [], resume_step=9)
  assert read_metrics(workdir) == records


def test_progress_bar_shows_position_postfix_and_eta(tmp_path, capsys):
  log = MetricsLogger(str(tmp_path), total_steps=100, tensorboard=False)
  log.progress(40)  # resumed at step 40
  log.progress(50, loss=np.float32(1.234567), top1=0.5, **{'img/s': 1234.5})
  log.close()
  err = capsys.readouterr().err
  assert '50/100' in err
  assert 'loss=1.235' in err and 'top1=0.5' in err and 'img/s=1234' in err
  assert '<' in err  # tqdm's "elapsed<remaining" ETA field
