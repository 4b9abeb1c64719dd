"""What a run records about how it was made: the header and <workdir>/runs.jsonl."""

import importlib.metadata
import json
import logging
import os
import platform
import shutil
import stat
import subprocess

import jax
import numpy as np
import pytest

from nfnet_jax import benchmark, provenance, train
from tests import helpers
from tests.test_train import tiny_config


def test_header_names_the_versions_devices_and_command():
  header = provenance.run_header(['nfnet-train', '--config', 'experiments/digits.py'])
  versions = header['versions']
  assert versions['jax'] == jax.__version__
  assert versions['numpy'] == np.__version__
  assert versions['python'] == platform.python_version()
  assert versions['haiku'] == importlib.metadata.version('dm-haiku')
  assert versions['orbax'] == importlib.metadata.version('orbax-checkpoint')
  assert all(versions[k] for k in ('nfnet_jax', 'jaxlib', 'optax', 'tensorflow', 'tfds'))
  devices = header['devices']
  assert devices['local'] == len(jax.local_devices()) == 8  # tests/conftest.py
  assert devices['global'] == 8 and devices['process_count'] == 1
  assert devices['kind'] == jax.local_devices()[0].device_kind
  json.dumps(header)  # a runs.jsonl record

  text = provenance.format_header(header)
  assert len(text.splitlines()) <= 5
  assert f'jax {jax.__version__}' in text and f'numpy {np.__version__}' in text
  assert f'8 x {devices["kind"]}' in text
  assert 'nfnet-train --config experiments/digits.py' in text


def _git(repo, *args):
  subprocess.run(['git', *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
  repo = tmp_path / 'repo'
  (repo / 'pkg').mkdir(parents=True)
  (repo / 'pkg' / 'mod.py').write_text('x = 1\n')
  _git(repo, 'init', '-q')
  _git(repo, 'add', '.')
  _git(repo, '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '-m', 'first')
  return repo


def _head_from_files(repo) -> str:
  """HEAD's commit read from .git itself, not through git."""
  ref = (repo / '.git' / 'HEAD').read_text().strip().removeprefix('ref: ')
  loose = repo / '.git' / ref
  if loose.exists():
    return loose.read_text().strip()
  for line in (repo / '.git' / 'packed-refs').read_text().splitlines():
    if line.endswith(' ' + ref):
      return line.split()[0]
  raise AssertionError(f'no {ref} in {repo}')


def test_git_commit_and_dirty_flag_of_a_checkout(checkout):
  state = provenance.git_state(str(checkout / 'pkg'))
  assert state['commit'] == _head_from_files(checkout) and len(state['commit']) == 40
  assert state['dirty'] is False and state['note'] is None
  assert os.path.realpath(state['root']) == os.path.realpath(checkout)
  (checkout / 'workdirs').mkdir()
  (checkout / 'workdirs' / 'metrics.jsonl').write_text('{}\n')  # untracked: still clean
  assert provenance.git_state(str(checkout / 'pkg'))['dirty'] is False
  (checkout / 'pkg' / 'mod.py').write_text('x = 2\n')
  assert provenance.git_state(str(checkout / 'pkg'))['dirty'] is True


def test_no_checkout_no_git_or_a_stuck_git_give_no_commit(checkout, tmp_path, monkeypatch):
  plain = tmp_path / 'site-packages' / 'pkg'
  plain.mkdir(parents=True)
  # Not in a repository, and untracked inside one (a virtualenv inside a checkout).
  inside = checkout / '.venv' / 'pkg'
  inside.mkdir(parents=True)
  for path in (plain, inside):
    state = provenance.git_state(str(path))
    assert (state['commit'], state['dirty'], state['note']) == (None, None, 'not a git checkout')

  sleep = shutil.which('sleep')
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  assert provenance.git_state(str(checkout))['note'] == 'git is not installed'

  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  fake = bin_dir / 'git'
  # A git that hangs in a child process of its own, which holds the output pipe open.
  pid_file = tmp_path / 'child.pid'
  fake.write_text(f'#!/bin/sh\n{sleep} 600 &\necho $! > {pid_file}\nwait\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('PATH', str(bin_dir))
  state = provenance.git_state(str(checkout), timeout=0.5)
  assert state['commit'] is None and state['note'] == 'git took more than 0.5 s'
  child = f'/proc/{int(pid_file.read_text())}/stat'
  assert not os.path.exists(child) or open(child).read().split(') ')[1][0] == 'Z', 'killed'
  monkeypatch.setattr(provenance, 'GIT_TIMEOUT_S', 0.5)
  assert 'git took more than 0.5 s' in provenance.format_header(provenance.run_header([]))


def test_run_records_are_appended_whole(tmp_path):
  workdir = str(tmp_path / 'w')
  header = {'argv': ['a'], 'versions': {'jax': '1'}}
  first = provenance.append_run_record(workdir, header, start_step=0, config={'seed': 0})
  second = provenance.append_run_record(
    workdir, header, start_step=7, config={'seed': 0}, config_changes=['eval.batch_size: 1 -> 2']
  )
  lines = open(os.path.join(workdir, provenance.RUNS_FILE)).read().splitlines()
  assert [json.loads(line) for line in lines] == [first, second]
  assert provenance.read_run_records(workdir) == [first, second]
  assert [r['start_step'] for r in (first, second)] == [0, 7]
  assert second['config_changes'] == ['eval.batch_size: 1 -> 2'] and second['argv'] == ['a']


@pytest.mark.slow
def test_every_start_is_recorded_and_a_changed_eval_setting_is_logged(
  tmp_path, monkeypatch, capsys, caplog
):
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_steps=4)

  # Stop after step 2 as a SIGTERM would: the step is saved, then the run ends.
  def stop_at_two(self, step):
    self.signal_name = 'SIGTERM'
    return step == 2

  with monkeypatch.context() as patch:
    patch.setattr(train.StopRequests, 'requested', stop_at_two)
    with pytest.raises(train.TrainingStopped):
      train.train_and_evaluate(config, workdir, progress_bar=False)
  (first,) = provenance.read_run_records(workdir)
  assert first['start_step'] == 0 and first['config_changes'] == []
  assert first['config'] == train.config_to_dict(config)
  assert first['versions']['jax'] == jax.__version__ and first['devices']['global'] == 8
  assert 'from step 0 of 4' in capsys.readouterr().err

  # The evaluation batch does not define the run: resumed, with the change logged.
  config.eval.batch_size = 40
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir, progress_bar=False)
  assert 'eval.batch_size: 56 -> 40' in caplog.text
  err = capsys.readouterr().err
  assert f'jax {jax.__version__}' in err and 'from step 2 of 4' in err
  records = provenance.read_run_records(workdir)
  assert records[0] == first, 'an earlier record is kept as it was'
  assert [r['start_step'] for r in records] == [0, 2]
  assert records[1]['config_changes'] == ['eval.batch_size: 56 -> 40']
  assert records[1]['config']['eval']['batch_size'] == 40

  # A run-defining change is still refused, and adds no record.
  config.train.batch_size = 32
  with pytest.raises(ValueError, match='train.batch_size: 16 -> 32'):
    train.train_and_evaluate(config, workdir, progress_bar=False)
  assert len(provenance.read_run_records(workdir)) == 2

  # Evaluation prints the header too, and records no start.
  capsys.readouterr()
  train.evaluate(tiny_config(num_steps=4), workdir)
  assert f'jax {jax.__version__}' in capsys.readouterr().err
  assert len(provenance.read_run_records(workdir)) == 2


def test_benchmark_prints_the_header_before_its_figures(capsys):
  argv = list(helpers.TINY_BENCHMARK_FLAGS)
  assert benchmark.main(argv) == 0
  out, err = capsys.readouterr()
  assert f'jax {jax.__version__}' in err and 'devices: 8 x ' in err
  assert out.startswith('F0 eval: batch 1/device x 1 '), 'stdout holds the figures alone'
