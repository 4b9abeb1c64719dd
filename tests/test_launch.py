"""launch/: the Cloud TPU scripts, run for real (bash) against a fake gcloud.

tests/fake_gcloud/ is first on PATH: it records every gcloud call and simulates the slices,
their workers and a GCS bucket (its docstring says how). The scripts run from a copy of
launch/ in a small git repository of the test's own, because setup_tpu.sh copies
`git archive` of the checkout it belongs to. The CLOUDSDK_* settings below would also keep a
real gcloud, were one reached, away from any account and endpoint.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FAKE_BIN = pathlib.Path(__file__).resolve().parent / 'fake_gcloud'
SCRIPTS = sorted(p.name for p in (REPO / 'launch').glob('*.sh') if p.name != 'lib.sh')
SLICE = ['--project', 'proj', '--zone', 'us-central2-b', '--name', 'nfnet-spot']
WORKDIR = 'gs://bucket/nfnet/f0'
MARKER = ('gcs', 'bucket', 'nfnet', 'f0', 'params_ema.npz')
TRAIN = ['--workdir', WORKDIR, '--config', 'experiments/digits.py']
TRAIN_ARGS = ['--config', 'experiments/digits.py', '--workdir', WORKDIR, '--distributed']
# What the scripts read from the environment: the tests pass their settings as flags only.
SCRIPT_SETTINGS = (
  'PROJECT ZONE TPU_NAME ACCELERATOR_TYPE TPU_VERSION SPOT PREEMPTIBLE QUEUED DRY_RUN WORKDIR '
  'CONFIG TFDS_DATA_DIR CHECK_AFTER_SECS MAX_RESTARTS MAX_FAILURES POLL_INTERVAL '
  'MAX_POLL_ERRORS DELETE_WHEN_DONE JAX_VERSION REMOTE_PYTHON REMOTE_DIR REMOTE_VENV '
  'REMOTE_LOGS FRESH_VENV COMMIT_REV WORKER TAIL_LINES'
).split()
TIMESTAMP = r'^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\] '


def _git(cwd, *args):
  env = {
    **os.environ,
    'GIT_CONFIG_GLOBAL': os.devnull,
    'GIT_CONFIG_NOSYSTEM': '1',
    'GIT_AUTHOR_NAME': 'test',
    'GIT_AUTHOR_EMAIL': 'test@example.com',
    'GIT_COMMITTER_NAME': 'test',
    'GIT_COMMITTER_EMAIL': 'test@example.com',
  }
  cmd = ['git', '-c', 'commit.gpgsign=false', *args]
  return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
  """A two-commit git repository holding launch/: (its path, [first commit, HEAD])."""
  root = tmp_path_factory.mktemp('checkout')
  shutil.copytree(REPO / 'launch', root / 'launch')
  _git(root, 'init', '-q')
  commits = []
  for text in ('first\n', 'second\n'):
    (root / 'VERSION').write_text(text)
    _git(root, 'add', '-A')
    _git(root, 'commit', '-q', '-m', text.strip())
    commits.append(_git(root, 'rev-parse', 'HEAD').strip())
  return root, commits


class Cloud:
  """The fake gcloud's world, and the launch/ scripts run against it."""

  def __init__(self, root, checkout_dir):
    self.root = root
    self.checkout = checkout_dir
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
    env = {k: v for k, v in env.items() if not k.startswith('CLOUDSDK_')}
    env.update(
      PATH=f'{FAKE_BIN}{os.pathsep}{os.environ["PATH"]}',
      FAKE_GCLOUD_DIR=str(root),
      FAKE_GCLOUD_PYTHON=sys.executable,
      # A real gcloud would get an empty configuration, no credentials, prompts off and
      # unreachable endpoints.
      CLOUDSDK_CONFIG=str(root / 'cloudsdk'),
      CLOUDSDK_CORE_DISABLE_PROMPTS='1',
      CLOUDSDK_AUTH_DISABLE_CREDENTIALS='true',
      CLOUDSDK_CORE_DISABLE_USAGE_REPORTING='true',
      CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK='true',
      CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU='http://127.0.0.1:9/',
      CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE='http://127.0.0.1:9/',
      CHECK_AFTER_SECS='0',  # train_tpu.sh's look after a start, which sleeps first
    )
    self.env = env

  def command(self, script, *args):
    return [str(self.checkout / 'launch' / script), *args]

  def run(self, script, *args, **env):
    return subprocess.run(
      self.command(script, *args),
      env={**self.env, **env},
      capture_output=True,
      text=True,
      stdin=subprocess.DEVNULL,
      timeout=120,  # a safety net for a loop gone wrong, not a timing check
    )

  def calls(self):
    path = self.root / 'calls.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def state(self):
    return json.loads((self.root / 'state.json').read_text())

  def set_state(self, **changes):
    path = self.root / 'state.json'
    state = json.loads(path.read_text()) if path.exists() else {}
    state.update(changes)
    path.write_text(json.dumps(state))

  def add_node(self, name='nfnet-spot', state='READY', setup=None, training=None):
    nodes = self.state().get('nodes', {}) if (self.root / 'state.json').exists() else {}
    nodes[name] = {
      'name': name,
      'state': state,
      'project': 'proj',
      'zone': 'us-central2-b',
      'accelerator_type': 'v4-32',
      'version': 'tpu-ubuntu2204-base',
      'capacity': 'spot',
      'setup': setup,
      'training': training,
      'copied': setup is not None,
    }
    self.set_state(nodes=nodes)


@pytest.fixture
def cloud(tmp_path, checkout):
  return Cloud(tmp_path, checkout[0])


def tpu_calls(calls, verb):
  return [c for c in calls if c[:4] == ['compute', 'tpus', 'tpu-vm', verb]]


def remote_commands(calls):
  """The --command of every ssh call, in order."""
  out = []
  for c in tpu_calls(calls, 'ssh'):
    i = c.index('--command')
    out.append(c[i + 1])
  return out


def index_of(calls, predicate, start=0):
  return next(i for i, c in enumerate(calls) if i >= start and predicate(c))


def is_setup(c):
  return c[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh'] and 'nfnet_jax_setup.sh' in c[-1]


def is_start(c):
  return c[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh'] and 'nohup' in c[-1]


def dry_run_commands(stdout):
  """The commands a --dry-run printed ('+ gcloud ...', shell-quoted), as argv lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def assert_usage_error(result, message):
  """Exit 2, and on stderr one error line and the usage hint."""
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 2, result.stderr
  assert lines[0].startswith('launch/') and ': error: ' in lines[0]
  assert message in lines[0]
  assert re.fullmatch(r"Run 'launch/\w+\.sh --help' for usage\.", lines[1])


# ---------------------------------------------------------------------------
# The fake itself.
# ---------------------------------------------------------------------------


def test_the_fake_is_the_gcloud_the_scripts_find(cloud):
  found = shutil.which('gcloud', path=cloud.env['PATH'])
  assert pathlib.Path(found) == FAKE_BIN / 'gcloud'
  result = subprocess.run(
    ['gcloud', 'storage', 'ls', 'gs://bucket/nothing'],
    env=cloud.env,
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 1 and 'matched no objects' in result.stderr
  assert cloud.calls() == [['storage', 'ls', 'gs://bucket/nothing']]


def test_the_fake_rejects_flags_gcloud_would_reject(cloud):
  result = cloud.run('create_tpu.sh', *SLICE, '--spot')  # fine
  assert result.returncode == 0, result.stderr
  bad = subprocess.run(
    [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'describe',
      'nfnet-spot',
      '--zone',
      'z',
      '--project',
      'p',
      '--bogus',
    ],
    env=cloud.env,
    capture_output=True,
    text=True,
    check=False,
  )
  assert bad.returncode == 2 and 'unrecognized arguments: --bogus' in bad.stderr


# ---------------------------------------------------------------------------
# The existing scripts: --help, --dry-run, and what they run.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_prints_the_usage_and_runs_nothing(cloud, script):
  result = cloud.run(script, '--help')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f'Usage: launch/{script} ')
  assert result.stderr == ''
  assert cloud.calls() == []


@pytest.mark.parametrize(
  'flags, capacity',
  [(['--spot'], ['--spot']), (['--preemptible'], ['--preemptible']), ([], [])],
)
def test_create_runs_tpu_vm_create_with_the_capacity_asked_for(cloud, flags, capacity):
  args = [*SLICE, '--accelerator-type', 'v3-32', '--version', 'tpu-ubuntu2204-base', *flags]
  expected = [
    'compute', 'tpus', 'tpu-vm', 'create', 'nfnet-spot', '--project', 'proj',
    '--zone', 'us-central2-b', '--accelerator-type', 'v3-32',
    '--version', 'tpu-ubuntu2204-base', *capacity,
  ]  # fmt: skip
  dry = cloud.run('create_tpu.sh', *args, '--dry-run')
  assert dry.returncode == 0, dry.stderr
  assert dry_run_commands(dry.stdout) == [['gcloud', *expected]]
  assert cloud.calls() == []

  result = cloud.run('create_tpu.sh', *args)
  assert result.returncode == 0, result.stderr
  assert cloud.calls() == [expected]
  node = cloud.state()['nodes']['nfnet-spot']
  assert (node['state'], node['accelerator_type']) == ('READY', 'v3-32')
  assert node['capacity'] == (capacity[0][2:] if capacity else 'on-demand')


def test_create_queued_spot_asks_for_a_queued_resource(cloud):
  result = cloud.run('create_tpu.sh', *SLICE, '--queued', '--spot', '--dry-run')
  assert result.returncode == 0, result.stderr
  (cmd,) = dry_run_commands(result.stdout)
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'nfnet-spot']
  assert cmd[cmd.index('--node-id') + 1] == 'nfnet-spot' and cmd[-1] == '--spot'


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--spot', '--preemptible'], '--spot and --preemptible'),
    (['--queued', '--preemptible'], '--queued takes --spot, not --preemptible'),
    (['--accelerator-type', 'v4'], "invalid accelerator type 'v4'"),
    (['--name', 'Bad_Name'], "invalid TPU name 'Bad_Name'"),
    (['--zone'], '--zone needs a value'),
  ],
)
def test_create_refuses_bad_settings_before_running_anything(cloud, flags, message):
  assert_usage_error(cloud.run('create_tpu.sh', *SLICE, *flags), message)
  assert cloud.calls() == []


def test_delete_deletes_without_a_prompt_with_yes(cloud):
  cloud.add_node()
  result = cloud.run('delete_tpu.sh', *SLICE, '--yes')
  assert result.returncode == 0, result.stderr
  assert cloud.calls() == [
    ['compute', 'tpus', 'tpu-vm', 'delete', 'nfnet-spot', '--project', 'proj',
     '--zone', 'us-central2-b', '--quiet'],
  ]  # fmt: skip
  assert cloud.state()['nodes'] == {}


def test_setup_copies_the_commit_and_installs_on_every_worker(cloud, checkout):
  head = checkout[1][1]
  cloud.add_node()
  result = cloud.run('setup_tpu.sh', *SLICE)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  scp = tpu_calls(calls, 'scp')
  assert len(scp) == 1 and scp[0][-6:] == [
    'nfnet-spot:', '--worker=all', '--project', 'proj', '--zone', 'us-central2-b'
  ]  # fmt: skip
  install, check = remote_commands(calls)
  words = shlex.split(install)
  assert words[:5] == ['bash', 'nfnet_jax_setup.sh', head, '0.10.2', 'python3.11']
  assert 'NFNET_SETUP' in check
  assert all('--worker=all' in c for c in tpu_calls(calls, 'ssh'))
  assert f'All 4 workers: commit={head} jax=0.10.2' in result.stdout
  with tarfile.open(cloud.root / 'scp' / 'nfnet_jax.tar.gz') as tar:
    assert tar.extractfile('VERSION').read() == b'second\n'
    assert 'launch/setup_tpu.sh' in tar.getnames()


def test_setup_commit_pins_the_code_the_workers_get(cloud, checkout):
  first = checkout[1][0]
  cloud.add_node()
  result = cloud.run('setup_tpu.sh', *SLICE, '--commit', first)
  assert result.returncode == 0, result.stdout + result.stderr
  assert f'the workers get commit {first}' in result.stderr
  assert shlex.split(remote_commands(cloud.calls())[0])[2] == first
  with tarfile.open(cloud.root / 'scp' / 'nfnet_jax.tar.gz') as tar:
    assert tar.extractfile('VERSION').read() == b'first\n'


def test_setup_refuses_a_commit_it_does_not_have(cloud):
  assert_usage_error(cloud.run('setup_tpu.sh', *SLICE, '--commit', 'nosuchbranch'), 'nosuchbranch')
  assert cloud.calls() == []


def test_setup_dry_run_prints_the_copy_and_the_install(cloud, checkout):
  result = cloud.run('setup_tpu.sh', *SLICE, '--dry-run')
  assert result.returncode == 0, result.stderr
  scp, ssh = dry_run_commands(result.stdout)
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'nfnet-spot']
  assert shlex.split(ssh[ssh.index('--command') + 1])[2] == checkout[1][1]
  assert cloud.calls() == []


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Records each call (shell-quoted) and acts out what nfnet_jax_setup.sh needs of python.
printf '%q ' "$0" "$@" >> "$FAKE_PYTHON_LOG"; echo >> "$FAKE_PYTHON_LOG"
case "$1 $2" in
  '-m venv') mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  '-m pip') [[ "$3" == freeze ]] && echo 'jax==0.10.2' || true ;;
  -c*) [[ "$2" == *device_count* ]] && echo '0.10.2 16 4' || echo '0.10.2' ;;
esac
"""


def setup_requirements():
  """setup.py's install_requires and extras_require, as setuptools gets them, parsed."""
  import runpy
  from unittest import mock

  from packaging.requirements import Requirement
  import setuptools

  with mock.patch.object(setuptools, 'setup') as setup:
    runpy.run_path(str(REPO / 'setup.py'))
  kwargs = setup.call_args.kwargs
  install = [Requirement(r) for r in kwargs['install_requires']]
  extras = {k: [Requirement(r) for r in v] for k, v in kwargs['extras_require'].items()}
  return install, extras


def test_setup_installs_the_projects_tpu_extra(cloud, tmp_path):
  cloud.add_node()
  result = cloud.run('setup_tpu.sh', *SLICE)
  assert result.returncode == 0, result.stdout + result.stderr
  words = shlex.split(remote_commands(cloud.calls())[0])
  # Run what every worker got, for real, in a home directory of its own with a python
  # that records how it is called.
  home = tmp_path / 'home'
  home.mkdir()
  for name in ('nfnet_jax.tar.gz', 'nfnet_jax_setup.sh'):
    shutil.copy(cloud.root / 'scp' / name, home / name)
  python = tmp_path / 'python3.11'
  python.write_text(FAKE_PYTHON)
  python.chmod(0o755)
  log = tmp_path / 'python_calls.txt'
  words[4] = str(python)
  worker = subprocess.run(
    words,
    cwd=home,
    env={**cloud.env, 'HOME': str(home), 'FAKE_PYTHON_LOG': str(log)},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert worker.returncode == 0, worker.stdout + worker.stderr
  assert 'jax 0.10.2: 16 devices in the slice, 4 on this worker' in worker.stdout
  calls = [shlex.split(line) for line in log.read_text().splitlines()]
  installs = [c[4:] for c in calls if c[1:4] == ['-m', 'pip', 'install'] and '--upgrade' not in c]
  # One resolver run: the checkout with its `tpu` extra, and jax pinned to one version.
  assert installs == [['-q', 'jax==0.10.2', '-e', f'{home}/nfnet_jax[tpu]']]
  assert (home / 'nfnet_jax' / 'launch' / 'setup_tpu.sh').exists()
  # The extra is setup.py's: jax[tpu] on the same jax range as the CPU install, per Python.
  install, extras = setup_requirements()
  jax_pins = {(str(r.specifier), str(r.marker)) for r in install if r.name == 'jax'}
  assert len(jax_pins) == 2  # one per Python line
  for name, jax_extra in (('tpu', {'tpu'}), ('gpu', {'cuda12'}), ('gpu-cuda13', {'cuda13'})):
    assert all(r.name == 'jax' and r.extras == jax_extra for r in extras[name])
    assert {(str(r.specifier), str(r.marker)) for r in extras[name]} == jax_pins


def test_train_starts_the_same_command_on_every_worker(cloud):
  cloud.add_node(setup='commit=abc jax=0.10.2 packages=123')
  extra = ['--config.train.num_steps=200', '--config.eval.batch_size=128']
  result = cloud.run('train_tpu.sh', *SLICE, *TRAIN, '--', *extra)
  assert result.returncode == 0, result.stdout + result.stderr
  check, start = tpu_calls(cloud.calls(), 'ssh')
  assert 'NFNET_BUSY' in check[-1]
  assert '--worker=all' in start  # one call starts every worker
  words = shlex.split(start[-1])
  assert words[:2] == ['bash', '-c'] and 'nohup' in words[2] and '-m nfnet_jax.train' in words[2]
  assert words[3:5] == ['nfnet_train', 'nfnet_jax']
  (started,) = cloud.state()['starts']
  assert started['args'] == [*TRAIN_ARGS, *extra]
  assert started['tfds'] == ''  # digits needs no data
  assert '4 workers ready, with the same install' in result.stdout


def test_train_dry_run_prints_the_start(cloud):
  args = [*SLICE, '--workdir', WORKDIR, '--tfds-data-dir', 'gs://bucket/tfds', '--dry-run']
  result = cloud.run('train_tpu.sh', *args, '--', '--config.train.batch_size=2048')
  assert result.returncode == 0, result.stderr
  (cmd,) = dry_run_commands(result.stdout)
  assert cmd[:10] == [
    'gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'nfnet-spot', '--worker=all',
    '--project', 'proj', '--zone',
  ]  # fmt: skip
  words = shlex.split(cmd[cmd.index('--command') + 1])
  assert words[8:] == [
    'gs://bucket/tfds', '--config', 'experiments/nfnet.py:F0', '--workdir', WORKDIR,
    '--distributed', '--config.train.batch_size=2048',
  ]  # fmt: skip
  assert cloud.calls() == []


@pytest.mark.parametrize(
  'args, message',
  [
    (['--workdir', '/tmp/run', '--config', 'experiments/digits.py'], 'must be on GCS'),
    (['--config', 'experiments/digits.py'], 'no workdir'),
    (['--workdir', WORKDIR], 'TFDS_DATA_DIR is not set'),
    ([*TRAIN, '--config.train.batch_size=8'], "unknown argument '--config.train.batch_size'"),
    (['--stop', '--status'], '--stop and --status'),
  ],
)
def test_train_refuses_bad_settings_before_running_anything(cloud, args, message):
  assert_usage_error(cloud.run('train_tpu.sh', *SLICE, *args), message)
  assert cloud.calls() == []


def test_train_starts_nothing_on_workers_without_the_install(cloud):
  cloud.add_node(setup=None)
  result = cloud.run('train_tpu.sh', *SLICE, *TRAIN)
  assert result.returncode == 2
  assert 'do not all have the same install' in result.stderr
  assert cloud.state()['starts'] == []


def test_train_status_and_stop(cloud):
  cloud.add_node(setup='commit=abc jax=0.10.2 packages=123')
  never = cloud.run('train_tpu.sh', *SLICE, '--status')
  assert never.returncode == 4 and 'NFNET_NONE t1v-n-fake-w-0' in never.stdout
  assert cloud.run('train_tpu.sh', *SLICE, *TRAIN).returncode == 0
  running = cloud.run('train_tpu.sh', *SLICE, '--status')
  assert running.returncode == 0, running.stdout
  assert 'Running on 4 workers, finished on 0, not running on 0.' in running.stdout
  assert f'--workdir {WORKDIR} --distributed' in running.stdout  # which run it is
  busy = cloud.run('train_tpu.sh', *SLICE, *TRAIN)
  assert busy.returncode == 2 and 'a run is already going on' in busy.stderr
  stop = cloud.run('train_tpu.sh', *SLICE, '--stop')
  assert stop.returncode == 0 and '[t1v-n-fake-w-3] stopped' in stop.stdout
  stopped = cloud.run('train_tpu.sh', *SLICE, '--status')
  assert stopped.returncode == 4 and 'exited with code 143' in stopped.stdout
  # A run that finished: exit code 0 on every worker.
  cloud.set_state(script=[{}, {'after_polls': 1, 'then': 'finish'}])
  assert cloud.run('train_tpu.sh', *SLICE, *TRAIN).returncode == 0
  gcloud = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'nfnet-spot', *SLICE[:4]]
  subprocess.run([*gcloud, '--format=value(state)'], env=cloud.env, check=True)
  finished = cloud.run('train_tpu.sh', *SLICE, '--status')
  assert finished.returncode == 3, finished.stdout


def test_train_status_says_when_a_worker_cannot_be_reached(cloud):
  cloud.add_node(state='PREEMPTED')
  result = cloud.run('train_tpu.sh', *SLICE, '--status')
  assert result.returncode == 1
  assert 'could not reach every worker of nfnet-spot' in result.stderr


def test_tail_logs_reads_every_workers_latest_log(cloud):
  cloud.add_node()
  result = cloud.run('tail_logs.sh', *SLICE, '--worker', 'all', '--lines', '5')
  assert result.returncode == 0, result.stderr
  (ssh,) = tpu_calls(cloud.calls(), 'ssh')
  assert '--worker=all' in ssh and 'tail -n 5' in ssh[-1] and 'latest.log' in ssh[-1]
  assert result.stdout.count('loss=') == 4


# ---------------------------------------------------------------------------
# run_spot.sh, the supervisor.
# ---------------------------------------------------------------------------


def supervise(cloud, *flags, extra=(), **env):
  args = [*SLICE, '--accelerator-type', 'v4-32', *TRAIN, '--poll-interval', '0', *flags]
  if extra:
    args += ['--', *extra]
  return cloud.run('run_spot.sh', *args, **env)


def test_supervisor_without_preemption_creates_sets_up_trains_and_stops_when_done(cloud, checkout):
  cloud.set_state(script=[{'after_polls': 3, 'then': 'finish'}])
  result = supervise(cloud, extra=['--config.train.num_steps=200'])
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  assert tpu_calls(calls, 'create') == [
    ['compute', 'tpus', 'tpu-vm', 'create', 'nfnet-spot', '--project', 'proj',
     '--zone', 'us-central2-b', '--accelerator-type', 'v4-32',
     '--version', 'tpu-ubuntu2204-base', '--spot'],
  ]  # fmt: skip
  (started,) = cloud.state()['starts']
  assert started['args'] == [*TRAIN_ARGS, '--config.train.num_steps=200']
  assert started['setup'].startswith(f'commit={checkout[1][1]} ')
  # In order: create, copy, install, start; then polls until the export appears.
  create = index_of(calls, lambda c: c[3:4] == ['create'])
  scp = index_of(calls, lambda c: c[3:4] == ['scp'], create)
  setup = index_of(calls, is_setup, scp)
  start = index_of(calls, is_start, setup)
  describes = [c for c in calls[start:] if c[3:4] == ['describe']]
  assert describes[0][-1] == '--format=value(state)' and len(describes) == 3
  assert calls[-1] == ['storage', 'ls', f'{WORKDIR}/params_ema.npz']
  assert cloud.root.joinpath(*MARKER).exists()
  # The slice is left (not asked to delete it), and the log says so.
  assert tpu_calls(calls, 'delete') == []
  assert cloud.state()['nodes']['nfnet-spot']['state'] == 'READY'
  assert re.search(TIMESTAMP + 'the run is done: ' + re.escape(WORKDIR), result.stdout, re.M)
  assert 'launch/delete_tpu.sh --yes' in result.stdout
  for event in ('creating nfnet-spot', 'setting up nfnet-spot', 'training started'):
    assert re.search(TIMESTAMP + event, result.stdout, re.M), event


def test_supervisor_deletes_the_slice_when_done_if_asked(cloud):
  cloud.set_state(script=[{'after_polls': 2, 'then': 'finish'}])
  result = supervise(cloud, '--delete-when-done')
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  (delete,) = tpu_calls(calls, 'delete')
  assert delete[-1] == '--quiet'
  assert calls.index(delete) > index_of(calls, is_start)
  assert cloud.state()['nodes'] == {}


def test_supervisor_waits_a_while_for_the_trainer_to_exit_before_deleting(cloud):
  # The export appears while the trainer still runs (it exits right after writing it).
  cloud.set_state(script=[{'after_polls': 2, 'then': 'never'}])
  cloud.add_node(setup='commit=abc jax=0.10.2 packages=123')
  marker = cloud.root.joinpath(*MARKER)
  marker.parent.mkdir(parents=True)
  assert cloud.run('train_tpu.sh', *SLICE, *TRAIN).returncode == 0
  marker.write_bytes(b'export')
  result = supervise(cloud, '--delete-when-done')
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count('waiting for the trainer to exit') == 5  # then deleted anyway
  assert cloud.state()['nodes'] == {}


def test_supervisor_recreates_a_preempted_slice_and_resumes_the_same_command(cloud, checkout):
  cloud.set_state(
    script=[{'after_polls': 2, 'then': 'preempt'}, {'after_polls': 2, 'then': 'finish'}]
  )
  result = supervise(cloud, '--max-restarts', '1', extra=['--config.train.num_steps=200'])
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  creates = tpu_calls(calls, 'create')
  assert len(creates) == 2 and creates[0] == creates[1] and creates[0][-1] == '--spot'
  assert len(tpu_calls(calls, 'delete')) == 1
  setups = [c for c in calls if is_setup(c)]
  assert len(setups) == 2 and setups[0] == setups[1]
  first, second = cloud.state()['starts']
  assert second['args'] == first['args'] == [*TRAIN_ARGS, '--config.train.num_steps=200']
  assert second['setup'] == first['setup']  # the same commit on the new slice
  assert first['setup'].startswith(f'commit={checkout[1][1]} ')
  # Preempted, then deleted, created, set up and started again, in that order.
  start1 = index_of(calls, is_start)
  preempted = index_of(calls, lambda c: c[3:4] == ['describe'], start1 + 1)
  preempted = index_of(calls, lambda c: c[3:4] == ['describe'], preempted + 1)
  delete = index_of(calls, lambda c: c[3:4] == ['delete'], preempted)
  create2 = index_of(calls, lambda c: c[3:4] == ['create'], delete)
  start2 = index_of(calls, is_start, index_of(calls, is_setup, create2))
  assert preempted < delete < create2 < start2
  assert re.search(
    TIMESTAMP + r'slice nfnet-spot is PREEMPTED: preemption 1 \(--max-restarts 1\)',
    result.stdout,
    re.M,
  )
  assert cloud.root.joinpath(*MARKER).exists()
  assert cloud.state()['nodes']['nfnet-spot']['state'] == 'READY'


@pytest.mark.parametrize('max_restarts', [0, 2])
def test_supervisor_gives_up_after_max_restarts_preemptions(cloud, max_restarts):
  cloud.set_state(script=[{'after_polls': 1, 'then': 'preempt'}] * (max_restarts + 1))
  result = supervise(cloud, '--max-restarts', str(max_restarts))
  assert result.returncode == 1, result.stdout + result.stderr
  message = (
    f'giving up: the slice was preempted {max_restarts + 1} times, more than '
    f'--max-restarts {max_restarts}.'
  )
  assert re.search(TIMESTAMP + re.escape(message), result.stderr, re.M), result.stderr
  assert 'run the same command again to go on' in result.stderr
  calls = cloud.calls()
  assert len(tpu_calls(calls, 'create')) == max_restarts + 1
  assert len(cloud.state()['starts']) == max_restarts + 1
  assert cloud.state()['nodes'] == {}  # the last preempted slice is deleted too


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--max-restarts', 'x'], "--max-restarts takes a whole number, got 'x'"),
    (['--poll-interval', '-1'], "--poll-interval takes a number of seconds, got '-1'"),
    (['--workdir', '/tmp/run'], 'the workdir must be on GCS'),
    (['--accelerator-type', 'v4'], "invalid accelerator type 'v4'"),
    (['--bogus'], "unknown argument '--bogus'"),
    (['--max-failures'], '--max-failures needs a value'),
  ],
)
def test_supervisor_refuses_bad_arguments_with_one_error(cloud, flags, message):
  result = supervise(cloud, *flags)
  assert_usage_error(result, message)
  assert result.stderr.splitlines()[0].startswith('launch/run_spot.sh: error: ')
  assert "Run 'launch/run_spot.sh --help' for usage." in result.stderr
  assert cloud.calls() == []


def test_supervisor_refuses_a_missing_workdir_or_project(cloud):
  result = cloud.run('run_spot.sh', *SLICE)
  assert_usage_error(result, 'no workdir')
  result = cloud.run('run_spot.sh', '--zone', 'z', *TRAIN)
  assert_usage_error(result, 'no project')
  assert cloud.calls() == []


def test_supervisor_dry_run_prints_one_round_and_runs_nothing(cloud, checkout):
  result = supervise(cloud, '--preemptible', '--dry-run', extra=['--config.train.num_steps=9'])
  assert result.returncode == 0, result.stderr
  commands = dry_run_commands(result.stdout)
  verbs = [c[1:5] for c in commands]
  assert verbs[:3] == [
    ['storage', 'ls', f'{WORKDIR}/params_ema.npz'],
    ['compute', 'tpus', 'tpu-vm', 'describe'],
    ['compute', 'tpus', 'tpu-vm', 'delete'],
  ]
  create = next(c for c in commands if c[4:5] == ['create'])
  assert create[-1] == '--preemptible'
  ssh = [c for c in commands if c[4:5] == ['ssh']]
  assert shlex.split(ssh[0][-1])[2] == checkout[1][1]  # setup of the pinned commit
  assert shlex.split(ssh[1][-1])[-1] == '--config.train.num_steps=9'  # the start
  assert 'NFNET_ALIVE' in ssh[2][-1]  # the status polls
  assert cloud.calls() == []


def test_supervisor_restarts_a_training_that_died_on_a_ready_slice(cloud):
  cloud.set_state(
    script=[{'after_polls': 1, 'then': 'crash'}, {'after_polls': 1, 'then': 'finish'}]
  )
  result = supervise(cloud)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  assert len(tpu_calls(calls, 'create')) == 1 and tpu_calls(calls, 'delete') == []
  assert len([c for c in calls if is_setup(c)]) == 1  # the slice is fine: no new setup
  first, second = cloud.state()['starts']
  assert first['args'] == second['args']
  # Seen twice before it counts (a preemption may not show in the state yet), then the
  # leftovers are stopped on every worker and the same command is started again.
  assert 'looking again in 0 s' in result.stdout
  assert 'the training stopped on the READY slice nfnet-spot (its log:' in result.stdout
  assert '(failed step 1; --max-failures 5)' in result.stdout
  stop = index_of(calls, lambda c: c[3:4] == ['ssh'] and 'pkill' in c[-1])
  assert index_of(calls, is_start) < stop < index_of(calls, is_start, index_of(calls, is_start) + 1)


def test_supervisor_sets_up_again_after_a_failed_start(cloud):
  cloud.set_state(start_failures=1, script=[{'after_polls': 1, 'then': 'finish'}])
  result = supervise(cloud)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  starts = [i for i, c in enumerate(calls) if is_start(c)]
  setups = [i for i, c in enumerate(calls) if is_setup(c)]
  stops = [i for i, c in enumerate(calls) if c[3:4] == ['ssh'] and 'pkill' in c[-1]]
  assert len(starts) == 2 and len(setups) == 2 and len(stops) == 1
  assert setups[0] < starts[0] < stops[0] < setups[1] < starts[1]
  assert 'starting the training failed (failed step 1; --max-failures 5)' in result.stdout
  assert len(cloud.state()['starts']) == 1


def test_supervisor_gives_up_after_max_failures(cloud):
  cloud.set_state(script=[{'after_polls': 1, 'then': 'crash'}] * 3)
  result = supervise(cloud, '--max-failures', '1')
  assert result.returncode == 1, result.stdout + result.stderr
  assert 'giving up: more than --max-failures 1 failed steps; the last one: the training' in (
    result.stderr
  )
  assert len(cloud.state()['starts']) == 2


def test_supervisor_retries_a_create_that_found_no_capacity(cloud):
  cloud.set_state(create_failures=2, script=[{'after_polls': 1, 'then': 'finish'}])
  result = supervise(cloud, '--preemptible')
  assert result.returncode == 0, result.stdout + result.stderr
  creates = tpu_calls(cloud.calls(), 'create')
  assert len(creates) == 3 and all(c[-1] == '--preemptible' for c in creates)
  assert 'RESOURCE_EXHAUSTED' in result.stderr
  assert 'creating the slice failed (no preemptible capacity in us-central2-b right now?)' in (
    result.stdout
  )


def test_supervisor_rides_out_transient_gcloud_errors_but_not_endless_ones(cloud):
  cloud.set_state(describe_errors=2, script=[{'after_polls': 1, 'then': 'finish'}])
  result = supervise(cloud)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count('could not describe nfnet-spot') == 2
  assert 'UNAVAILABLE' in result.stdout

  cloud.set_state(describe_errors=3, nodes={}, starts=[])
  (cloud.root.joinpath(*MARKER)).unlink()
  result = supervise(cloud, MAX_POLL_ERRORS='3')
  assert result.returncode == 1
  assert 'giving up: 3 polls in a row failed' in result.stderr


def test_supervisor_gives_up_when_the_workers_stay_unreachable(cloud):
  # The slice goes on reading READY, but no ssh to it gets through any more.
  cloud.set_state(script=[{'after_polls': 1, 'then': 'unreachable'}])
  result = supervise(cloud, MAX_POLL_ERRORS='3')
  assert result.returncode == 1, result.stdout + result.stderr
  unreachable = re.findall(
    TIMESTAMP + 'could not reach every worker of nfnet-spot', result.stdout, re.M
  )
  assert len(unreachable) == 3  # the third in a row gives up
  assert 'giving up: 3 polls in a row failed' in result.stderr
  assert cloud.state()['nodes']['nfnet-spot']['state'] == 'READY'


def test_supervisor_stops_at_once_when_the_run_is_done_already(cloud):
  marker = cloud.root.joinpath(*MARKER)
  marker.parent.mkdir(parents=True)
  marker.write_bytes(b'export')
  result = supervise(cloud)
  assert result.returncode == 0, result.stdout + result.stderr
  assert cloud.calls() == [['storage', 'ls', f'{WORKDIR}/params_ema.npz']]


def test_supervisor_takes_over_its_run_already_going_on(cloud):
  # E.g. the supervisor was stopped and started again: nothing is re-created or restarted.
  cloud.add_node(setup='commit=abc jax=0.10.2 packages=123')
  cloud.set_state(script=[{'after_polls': 2, 'then': 'finish'}])
  assert cloud.run('train_tpu.sh', *SLICE, *TRAIN).returncode == 0
  result = supervise(cloud)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  assert tpu_calls(calls, 'create') == [] and tpu_calls(calls, 'scp') == []
  assert len(cloud.state()['starts']) == 1
  assert 'is already going on on nfnet-spot: supervising it' in result.stdout


def test_supervisor_leaves_another_run_alone(cloud):
  cloud.add_node(setup='commit=abc jax=0.10.2 packages=123')
  cloud.set_state(script=[{'then': 'never'}])
  other = ['--workdir', f'{WORKDIR}-other', '--config', 'experiments/digits.py']
  assert cloud.run('train_tpu.sh', *SLICE, *other).returncode == 0
  result = supervise(cloud)
  assert result.returncode == 1
  assert 'giving up: another run is going on on nfnet-spot' in result.stderr
  assert len(cloud.state()['starts']) == 1
  assert not any('pkill' in c for c in remote_commands(cloud.calls()))


def test_supervisor_sets_up_an_idle_existing_slice_and_trains(cloud):
  cloud.add_node()
  cloud.set_state(script=[{'after_polls': 1, 'then': 'finish'}])
  result = supervise(cloud)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = cloud.calls()
  assert tpu_calls(calls, 'create') == []
  assert len([c for c in calls if is_setup(c)]) == 1
  assert len(cloud.state()['starts']) == 1


def test_sigterm_stops_the_supervisor_and_leaves_the_run_going(cloud):
  cloud.set_state(script=[{'then': 'never'}])
  args = [*SLICE, *TRAIN, '--poll-interval', '600']
  proc = subprocess.Popen(
    cloud.command('run_spot.sh', *args),
    env=cloud.env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    stdin=subprocess.DEVNULL,
    text=True,
  )
  try:
    lines = []
    for line in proc.stdout:  # until it waits for its first poll
      lines.append(line)
      if 'training started' in line:
        break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    # The signal ends the wait for the next poll at once; 60 s is only a safety net.
    assert proc.wait(timeout=60) == 143
  finally:
    proc.kill()
    proc.stdout.close()
  assert 'stopped by SIGTERM' in rest
  assert 'launch/train_tpu.sh --stop --project proj' in rest
  state = cloud.state()
  assert state['nodes']['nfnet-spot']['training']['status'] == 'running'
  assert not any('pkill' in c for c in remote_commands(cloud.calls()))
