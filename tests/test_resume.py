"""The trainer under faults, end to end: a run killed (SIGKILL), stopped (SIGTERM,
SIGINT), resumed from a damaged checkpoint, run twice on one workdir, evaluated while
training, or started with bad input. Each fault is injected into a real trainer
process (tests/fault_runner.py); the checks are on what lands in the workdir."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from nfnet_jax import config as config_lib
from nfnet_jax import metrics as metrics_lib
from nfnet_jax import models, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12

# The quickstart's model and recipe (stochastic depth and dropout on: the resumed
# random streams must match too), at a test size: 12 steps, a checkpoint every 4.
TINY = [
  '--config',
  os.path.join(REPO, 'experiments', 'digits.py'),
  '--config.model.kwargs.width=0.0625',
  '--config.model.kwargs.group_size=8',
  '--config.data.image_size=16',
  '--config.train.batch_size=16',
  f'--config.train.num_steps={STEPS}',
  '--config.train.log_every_steps=1',
  '--config.train.eval_every_steps=1000',
  '--config.eval.batch_size=120',
  '--config.checkpoint.every_steps=4',
]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  env.update(extra)
  return env


def train_cmd(workdir, *extra):
  return [sys.executable, '-m', 'nfnet_jax.train', *TINY, '--workdir', workdir, *extra]


def run(cmd, **env):
  return subprocess.run(cmd, env=_env(**env), cwd=REPO, capture_output=True, text=True, timeout=600)


def run_with_fault(workdir, fault, step, *extra, **env):
  cmd = [sys.executable, '-m', 'tests.fault_runner', *TINY, '--workdir', workdir, *extra]
  return run(cmd, FAULT=fault, FAULT_STEP=str(step), **env)


def losses(workdir):
  """step -> training loss, failing on a step logged twice or out of order."""
  steps = [r['step'] for r in metrics_lib.read_metrics(workdir) if 'loss' in r]
  assert steps == sorted(set(steps)), f'duplicated or out-of-order steps: {steps}'
  return {r['step']: r['loss'] for r in metrics_lib.read_metrics(workdir) if 'loss' in r}


def exported(workdir):
  with np.load(os.path.join(workdir, weights.EXPORT_FILE)) as f:
    return {k: f[k] for k in f.files}


def assert_same_run(resumed, reference):
  """The resumed run's curve and final weights are the uninterrupted run's."""
  assert losses(resumed) == losses(reference)
  a, b = exported(resumed), exported(reference)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  last = [r for r in metrics_lib.read_metrics(reference) if 'eval_top1' in r][-1]
  again = [r for r in metrics_lib.read_metrics(resumed) if 'eval_top1' in r][-1]
  assert again['eval_top1'] == last['eval_top1'] and again['eval_loss'] == last['eval_loss']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted run, the yardstick of every resumed one."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  proc = run(train_cmd(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
  return workdir


def _finalized_steps(workdir):
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


@pytest.mark.parametrize('kill_at', [3, 10])  # before the first checkpoint; after two
def test_killed_run_resumes_exactly(tmp_path, reference, kill_at):
  workdir = str(tmp_path / 'run')
  killed = run_with_fault(workdir, 'kill', kill_at)
  assert killed.returncode == -9
  logged = [r['step'] for r in metrics_lib.read_metrics(workdir) if 'loss' in r]
  assert logged[-1] == kill_at
  # Step 8's save may or may not have finished when the process vanished; step 4's
  # had (a save waits for the one before it).
  saved = _finalized_steps(workdir)
  assert (4 in saved) == (kill_at > 4)
  restored = max(saved, default=0)
  resumed = run(train_cmd(workdir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_run(workdir, reference)
  # The first records of the redone steps, from work never checkpointed, are set
  # aside, not mixed into the curve.
  discarded = metrics_lib.read_metrics(os.path.join(workdir, metrics_lib.DISCARDED_FILENAME))
  assert sorted({r['step'] for r in discarded if 'loss' in r}) == list(
    range(restored + 1, kill_at + 1)
  )


@pytest.mark.parametrize(
  'fault,signal_name,code', [('term', 'SIGTERM', 143), ('int', 'SIGINT', 130)]
)
def test_signal_saves_the_step_reached_and_says_how_to_resume(
  tmp_path, reference, fault, signal_name, code
):
  workdir = str(tmp_path / 'run')
  stopped = run_with_fault(workdir, fault, 6)
  assert stopped.returncode == code, stopped.stderr[-3000:]
  assert 'Traceback' not in stopped.stderr
  message = [line for line in stopped.stderr.splitlines() if 'stopped by' in line]
  assert len(message) == 1, stopped.stderr[-3000:]
  # The signal lands while step 6 is logged; the loop saves the next step it ends.
  assert f'stopped by {signal_name} at step 7' in message[0]
  assert 'Resume with:' in message[0] and '--workdir' in message[0]
  assert '7' in os.listdir(os.path.join(workdir, 'checkpoints'))
  resumed = run(train_cmd(workdir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_run(workdir, reference)


def _truncate_data_files(step_dir):
  """Cuts every array-data file of a checkpoint step in half (a copy interrupted by a
  full disk, a partial rsync)."""
  cut = 0
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      path = os.path.join(root, name)
      if os.path.basename(root) == 'd' and os.path.getsize(path) > 1:
        os.truncate(path, os.path.getsize(path) // 2)
        cut += 1
  assert cut, sorted(os.walk(step_dir))


def test_damaged_newest_checkpoint_falls_back_and_is_kept_aside(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  stopped = run_with_fault(workdir, 'term', 10)  # checkpoints 8 and 11 complete
  assert stopped.returncode == 143, stopped.stderr[-3000:]
  assert _finalized_steps(workdir) == [8, 11]  # max_to_keep=2
  _truncate_data_files(os.path.join(workdir, 'checkpoints', '11'))
  resumed = run(train_cmd(workdir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # (Orbax's reads of the damaged step may print an 'Event loop is closed' traceback from
  # a background thread as it is abandoned; the run itself goes on.)
  assert 'read only' not in resumed.stderr
  warning = [line for line in resumed.stderr.splitlines() if ' is damaged ' in line]
  assert warning and 'step 11' in warning[0], resumed.stderr[-3000:]
  # Kept, out of the way, never deleted.
  kept = [p for p, _, _ in os.walk(workdir) if os.path.basename(p).startswith('11')]
  assert any('damaged' in p for p in kept), kept
  assert_same_run(workdir, reference)


def test_a_second_trainer_is_refused_and_eval_reads_alongside(tmp_path):
  workdir = str(tmp_path / 'run')
  flags_dir = str(tmp_path / 'flags')
  os.makedirs(flags_dir)
  first = subprocess.Popen(
    [sys.executable, '-m', 'tests.fault_runner', *TINY, '--workdir', workdir],
    env=_env(FAULT='pause', FAULT_STEP='5', FAULT_DIR=flags_dir),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(flags_dir, 'paused')):
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline
      time.sleep(0.1)
    second = run(train_cmd(workdir))
    assert second.returncode == 1
    assert 'Traceback' not in second.stderr
    assert str(first.pid) in second.stderr, second.stderr[-2000:]
    # Evaluation reads the newest checkpoint (step 4) while the trainer holds the
    # workdir, and leaves the trainer's files alone.
    evaluated = run(train_cmd(workdir, '--mode', 'eval'))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 'eval_count=360' in evaluated.stdout
  finally:
    open(os.path.join(flags_dir, 'release'), 'w').close()
    out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
  assert os.path.isfile(os.path.join(workdir, weights.EXPORT_FILE))


def _listing(path):
  if not os.path.exists(path):
    return None
  found = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      found[os.path.relpath(full, path)] = open(full, 'rb').read()
  return found


EIGHT_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
# case -> (extra flags, what the one error line names, environment)
BAD_INPUT = {
  'unknown variant': (['--config.model.kwargs.variant=F99'], 'Unknown variant', {}),
  'misspelled field': (['--config.train.bach_size=8'], 'batch_size', {}),
  'eval split the dataset lacks': (['--config.eval.splits=validation'], 'eval.splits', {}),
  'eval batch that does not divide': (
    ['--config.eval.batch_size=100'],
    '--config.eval.batch_size',
    EIGHT_DEVICES,
  ),
  'missing weights to start from': (['--config.init_from=/nonexistent/F0.npz'], 'init_from', {}),
  'unknown parallel mode': (['--config.parallel=vmap'], 'parallel', {}),
  'accumulation that does not divide': (
    ['--config.train.grad_accum_steps=3'],
    'grad_accum_steps',
    {},
  ),
}


def _class_folder(root, second_class):
  """root/a/ with two images, root/b/ with `second_class` files ('' = empty)."""
  for name in ('a', 'b'):
    os.makedirs(os.path.join(root, name))
  for i in range(2):
    Image.new('RGB', (8, 8), (i * 100, 0, 0)).save(os.path.join(root, 'a', f'{i}.png'))
  if second_class == 'corrupt':
    for i in range(2):
      with open(os.path.join(root, 'b', f'{i}.jpg'), 'wb') as f:
        f.write(b'\xff\xd8\xff not a jpeg')


@pytest.mark.parametrize('second_class,named', [('', 'b'), ('corrupt', 'b')])
def test_a_class_without_images_is_one_line_and_writes_nothing(tmp_path, second_class, named):
  root = str(tmp_path / 'images')
  _class_folder(root, second_class)
  workdir = str(tmp_path / 'run')
  proc = run(
    train_cmd(
      workdir,
      '--config.data.name=folder',
      f'--config.data.folder={root}',
      '--config.eval.splits=train',
    )
  )
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('nfnet-train: error')]
  assert len(errors) == 1 and 'no decodable image' in errors[0] and f"['{named}']" in errors[0]
  assert not os.path.exists(workdir)


def test_weights_of_another_variant_are_refused_before_anything_is_written(tmp_path):
  # F0 at twice the test width: every convolution has other shapes.
  wide = config_lib.model_config('F0')
  wide.kwargs.update(width=0.125, group_size=8)
  model = models.build_model(wide, 10)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32), is_training=True)
  path = str(tmp_path / 'wide.npz')
  weights.save_converted(jax.device_get(params), path, 'F0')
  workdir = str(tmp_path / 'run')
  proc = run(train_cmd(workdir, f'--config.init_from={path}'))
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('nfnet-train: error')]
  assert len(errors) == 1 and path in errors[0], proc.stderr[-3000:]
  assert not os.path.exists(workdir)


@pytest.mark.parametrize('case', sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
  extra, expected, env = BAD_INPUT[case]
  workdir = str(tmp_path / 'run')
  proc = run(train_cmd(workdir, *extra), **env)
  assert proc.returncode in (1, 2), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('nfnet-train: error')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert expected in errors[0], errors[0]
  assert not os.path.exists(workdir), os.listdir(workdir)


def test_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'run'
  path.write_text('not a directory')
  proc = run(train_cmd(str(path)))
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert 'is a file' in proc.stderr
  assert path.read_text() == 'not a directory'


def test_verbose_shows_the_traceback(tmp_path):
  proc = run(train_cmd(str(tmp_path / 'run'), '--config.parallel=vmap', '--verbose'))
  assert proc.returncode != 0
  assert 'Traceback' in proc.stderr


def test_resume_with_another_batch_size_or_optimizer_is_refused_untouched(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  killed = run_with_fault(workdir, 'kill', 6)
  assert killed.returncode == -9
  before = _listing(workdir)
  for extra, named in (
    (['--config.train.batch_size=32'], 'train.batch_size: 16 -> 32'),
    (['--config.optimizer.momentum=0.5'], 'optimizer.momentum: 0.9 -> 0.5'),
  ):
    proc = run(train_cmd(workdir, *extra))
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert named in proc.stderr and '--allow_config_change' in proc.stderr
    assert _listing(workdir) == before
  # The original command still resumes, exactly.
  resumed = run(train_cmd(workdir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_run(workdir, reference)


def test_config_json_records_the_resolved_config(reference):
  stored = json.load(open(os.path.join(reference, 'config.json')))
  assert stored['train']['batch_size'] == 16 and stored['train']['num_steps'] == STEPS
  assert stored['model']['kwargs']['width'] == 0.0625
