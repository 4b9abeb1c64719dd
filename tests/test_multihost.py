"""Rehearses a 2-host pod slice on this CPU machine, through the real command line.

Two processes of `python -m nfnet_jax.train ... --coordinator_address localhost:PORT
--num_processes 2 --process_id i`, each with 2 simulated CPU devices (4 in all), join
one JAX job exactly as the hosts of a TPU pod do after `--distributed` (see
docs/tpu.md). The test checks what goes wrong on real pods when the multi-host code
paths are wrong:

* both processes finish (nothing hangs in a collective, a save or a restore);
* the checkpoint of the last step is written once, finalized, into the shared workdir;
* metrics.jsonl has one writer (process 0): every step is logged once, and the
  header counts the 4 devices of the whole job;
* evaluation counts every test digit exactly once across the two hosts
  (eval_count == 360): the psum of the eval step spans both processes;
* a second launch of both processes finds the run complete at that checkpoint
  (nothing is trained, evaluated or logged again) instead of restarting.

Runs in a few minutes on 2 CPU cores (the two XLA compilations of the train and
eval steps dominate; the second launch reuses them from the persistent
compilation cache).
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
NUM_STEPS = 6
NUM_TEST_DIGITS = 360
TIMEOUT_SECS = 900  # per launch; the test normally needs a fraction of it

# A tiny F0 (12 blocks, 1/16 of the channels) on 16x16 digits. Global batch 16 =
# 4 devices x 4; eval batch 40 = 4 devices x 10, so each host's 180 test digits
# take 9 batches of 20 with no padding. Checkpoints at steps 3 and 6.
OVERRIDES = (
  f'--config.train.num_steps={NUM_STEPS}',
  '--config.train.batch_size=16',
  f'--config.train.eval_every_steps={NUM_STEPS}',
  '--config.train.log_every_steps=1',
  '--config.checkpoint.every_steps=3',
  '--config.model.kwargs.width=0.0625',
  '--config.model.kwargs.group_size=8',
  '--config.data.image_size=16',
  '--config.eval.batch_size=40',
)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(cache_dir: str) -> dict:
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS='cpu',
    # 2 devices per process; the cheaper CPU code generation roughly halves the
    # compile time of the train step and does not change what is tested.
    XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} '
      '--xla_backend_optimization_level=0 '
      '--xla_llvm_disable_expensive_passes=true'
    ),
    TF_CPP_MIN_LOG_LEVEL='2',
    PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p),
  )
  # The second launch reuses the first one's compiled programs.
  env.setdefault('JAX_COMPILATION_CACHE_DIR', cache_dir)
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')
  return env


def _tail(path: str, lines: int = 40) -> str:
  """The last lines of a log, without absl's INFO chatter (Orbax narrates every save)."""
  with open(path, errors='replace') as f:
    text = f.read().replace('\r', '\n')
  kept = [line for line in text.splitlines() if not re.match(r'I\d{4} ', line)]
  return '\n'.join(kept[-lines:])


def _launch(workdir: str, logdir: str, tag: str, env: dict) -> list[str]:
  """Starts every process, waits for all; returns their log paths.

  A process that fails makes the others wait forever in a collective (as on a
  pod), so the survivors are stopped as soon as one process exits with an error.
  """
  port = _free_port()
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    log = os.path.join(logdir, f'{tag}-process{i}.log')
    cmd = [
      sys.executable,
      '-m',
      'nfnet_jax.train',
      '--config',
      'experiments/digits.py',
      '--workdir',
      workdir,
      '--coordinator_address',
      f'localhost:{port}',
      '--num_processes',
      str(NUM_PROCESSES),
      '--process_id',
      str(i),
      *OVERRIDES,
    ]
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    logs.append(log)

  deadline = time.monotonic() + TIMEOUT_SECS
  try:
    while True:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes):
        return logs
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed or time.monotonic() > deadline:
        reason = (
          f'process {failed[0]} exited with code {codes[failed[0]]}'
          if failed
          else f'timed out after {TIMEOUT_SECS} s (exit codes {codes})'
        )
        details = '\n'.join(
          f'--- {tag} process {i} (last lines of {log}):\n{_tail(log)}'
          for i, log in enumerate(logs)
        )
        pytest.fail(f'{tag}: {reason}.\n{details}')
      time.sleep(1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _checkpoint_entries(workdir: str) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


def test_two_process_pod_rehearsal_trains_evaluates_and_resumes(tmp_path):
  workdir = str(tmp_path / 'workdir')
  logdir = str(tmp_path / 'logs')
  os.makedirs(logdir)
  env = _env(str(tmp_path / 'xla_cache'))

  # --- First launch: train 6 steps, evaluate, checkpoint. ------------------------
  logs = _launch(workdir, logdir, 'first launch', env)

  entries = _checkpoint_entries(workdir)
  assert str(NUM_STEPS) in entries, f'no finalized checkpoint at step {NUM_STEPS}: {entries}'
  assert not [e for e in entries if 'tmp' in e], f'unfinalized checkpoint left: {entries}'
  assert os.path.isfile(
    os.path.join(workdir, 'checkpoints', str(NUM_STEPS), '_CHECKPOINT_METADATA')
  )

  records = _read_metrics(workdir)
  headers = [r for r in records if 'num_params' in r]
  assert len(headers) == 1, f'the header was written {len(headers)} times: {headers}'
  assert headers[0]['num_devices'] == NUM_PROCESSES * DEVICES_PER_PROCESS, headers[0]
  train_steps = [r['step'] for r in records if 'loss' in r]
  # One writer: a second writer would log every step twice.
  assert train_steps == list(range(1, NUM_STEPS + 1)), train_steps
  evals = [r for r in records if 'eval_count' in r]
  assert len(evals) == 1, f'expected one evaluation record, got {evals}'
  assert evals[0]['step'] == NUM_STEPS
  # Every test digit counted once: 180 per host, summed over both hosts.
  assert evals[0]['eval_count'] == NUM_TEST_DIGITS, evals[0]
  assert 0.0 <= evals[0]['eval_top1'] <= 1.0, evals[0]
  assert 0.0 <= evals[0]['eval_ema_top1'] <= 1.0, evals[0]

  # Only process 0 prints the final summary.
  with open(logs[0], errors='replace') as f:
    assert f'eval_count={NUM_TEST_DIGITS}' in f.read()
  with open(logs[1], errors='replace') as f:
    assert 'eval_count=' not in f.read()

  # --- Second launch, same command: resumes at step 6. ---------------------------
  logs = _launch(workdir, logdir, 'second launch (resume)', env)

  entries = _checkpoint_entries(workdir)
  steps = sorted(int(e) for e in entries if e.isdigit())
  assert steps[-1] == NUM_STEPS, f'the resumed run wrote checkpoints past the end: {entries}'
  assert not [e for e in entries if 'tmp' in e], f'unfinalized checkpoint left: {entries}'

  # Restored, not restarted, and complete: nothing is trained, evaluated or logged
  # again; process 0 reports the run's final evaluation.
  assert _read_metrics(workdir) == records
  with open(logs[0], errors='replace') as f:
    assert f'eval_count={NUM_TEST_DIGITS}' in f.read()
