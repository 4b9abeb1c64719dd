"""Tests for nfnet_jax.workdir: one trainer per workdir."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from nfnet_jax import workdir as workdir_lib
from nfnet_jax.workdir import WorkdirLockedError

ROOT = str(pathlib.Path(__file__).parents[1])

# A stand-in trainer: takes the lock, says so, and sleeps until killed.
_HOLDER_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from nfnet_jax import workdir
with workdir.lock(sys.argv[1], command='nfnet-train --config tiny.py --workdir WD',
                  backend=sys.argv[2], heartbeat_s=float(sys.argv[3])):
  print('LOCKED', flush=True)
  time.sleep(600)
"""


def start_holder(workdir, backend='flock', heartbeat_s=30.0):
  proc = subprocess.Popen(
    [
      sys.executable,
      '-c',
      _HOLDER_SCRIPT.format(root=ROOT),
      str(workdir),
      backend,
      str(heartbeat_s),
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  line = proc.stdout.readline()  # returns '' if the script dies first
  if line.strip() != 'LOCKED':
    proc.kill()
    raise AssertionError(f'holder did not take the lock: {line!r} {proc.stderr.read()[-3000:]}')
  return proc


def kill9(proc):
  proc.kill()  # SIGKILL: no clean-up code runs in the holder
  proc.wait(timeout=60)
  proc.stdout.close()
  proc.stderr.close()


def wait_for(predicate, what, timeout=60.0):
  """Polls `predicate` (a hang guard, not a timing assertion)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f'timed out waiting for {what}')


def assert_refusal_names(msg, pid):
  assert '\n' not in msg
  assert f'pid {pid} on host {socket.gethostname()}' in msg
  assert 'command: nfnet-train --config tiny.py --workdir WD' in msg
  assert 'started 2' in msg and 'UTC' in msg  # the start time, e.g. 2026-11-30 10:00:00 UTC
  assert 'another --workdir' in msg and '--mode eval' in msg


def test_a_second_trainer_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
  workdir = tmp_path / 'wd'
  holder = start_holder(workdir)
  try:
    found = workdir_lib.read_holder(str(workdir))
    assert found.pid == holder.pid and found.host == socket.gethostname()
    # This test process is the second trainer.
    with pytest.raises(WorkdirLockedError) as info:
      with workdir_lib.lock(str(workdir)):
        pass
    assert_refusal_names(str(info.value), holder.pid)
    assert (workdir / workdir_lib.LOCK_FILENAME).is_file()  # the refusal left it alone
  finally:
    kill9(holder)

  # The holder died without releasing anything; the kernel dropped its lock.
  assert (workdir / workdir_lib.LOCK_FILENAME).exists()
  assert workdir_lib.read_holder(str(workdir)) is None
  with workdir_lib.lock(str(workdir), command='second run') as held:
    assert held.holder.pid == os.getpid()
    found = workdir_lib.read_holder(str(workdir))
    assert found.pid == os.getpid() and found.command == 'second run'
  # A clean release leaves no lock file behind.
  assert not (workdir / workdir_lib.LOCK_FILENAME).exists()
  assert workdir_lib.read_holder(str(workdir)) is None


def test_the_lock_is_refused_within_one_process_too(tmp_path):
  with workdir_lib.lock(str(tmp_path)):
    with pytest.raises(WorkdirLockedError, match=f'pid {os.getpid()} '):
      workdir_lib.lock(str(tmp_path)).acquire()
  with workdir_lib.lock(str(tmp_path)):  # released: free again
    pass


def test_read_holder_creates_nothing(tmp_path):
  assert workdir_lib.read_holder(str(tmp_path / 'missing')) is None
  assert workdir_lib.read_holder(str(tmp_path)) is None
  assert workdir_lib.read_holder(str(tmp_path), backend='heartbeat') is None
  assert list(tmp_path.iterdir()) == []


def test_the_default_command_is_this_process_command_line(tmp_path):
  with workdir_lib.lock(str(tmp_path)) as held:
    assert held.holder.command.split()[0] == sys.orig_argv[0]


# ---------------------------------------------------------------------------
# The heartbeat lock used for remote (gs://) workdirs, run on a local path.
# ---------------------------------------------------------------------------


def read_record(workdir):
  return json.loads((workdir / workdir_lib.LOCK_FILENAME).read_text())


def test_heartbeat_lock_refuses_a_live_holder_and_expires_after_kill9(tmp_path, caplog):
  workdir = tmp_path / 'wd'
  # 1 s beats (stale after 4 s): slow enough that a busy CI machine cannot starve the
  # holder's thread into looking dead while it is alive.
  holder = start_holder(workdir, backend='heartbeat', heartbeat_s=1.0)
  try:
    # The holder's daemon thread keeps refreshing its heartbeat.
    first = read_record(workdir)['heartbeat']
    wait_for(lambda: read_record(workdir)['heartbeat'] > first, 'a heartbeat')
    with pytest.raises(WorkdirLockedError) as info:
      workdir_lib.lock(str(workdir), backend='heartbeat', heartbeat_s=0.2).acquire()
    assert_refusal_names(str(info.value), holder.pid)
    assert 'last heartbeat' in str(info.value)
    assert workdir_lib.read_holder(str(workdir), backend='heartbeat').pid == holder.pid
  finally:
    kill9(holder)

  # No more heartbeats: after a few missed ones the lock is stale and taken over.
  wait_for(
    lambda: workdir_lib.read_holder(str(workdir), backend='heartbeat') is None, 'a stale lock'
  )
  assert read_record(workdir)['pid'] == holder.pid  # the dead holder's file is still there
  with caplog.at_level(logging.WARNING):
    with workdir_lib.lock(str(workdir), backend='heartbeat', heartbeat_s=0.2) as held:
      assert read_record(workdir)['token'] == held.holder.token
  assert any(
    'Taking over the stale lock' in r.getMessage() and f'pid {holder.pid}' in r.getMessage()
    for r in caplog.records
  )
  assert not (workdir / workdir_lib.LOCK_FILENAME).exists()


def write_record(workdir, heartbeat, token='other'):
  record = {
    'host': 'tpu-host-7',
    'pid': 4242,
    'start_time': heartbeat - 100,
    'command': 'nfnet-train --config tiny.py --workdir WD',
    'token': token,
    'heartbeat': heartbeat,
    'heartbeat_s': 1.0,
  }
  (workdir / workdir_lib.LOCK_FILENAME).write_text(json.dumps(record))


def test_heartbeat_staleness_is_judged_by_the_holders_interval(tmp_path):
  # Fresh (within 4 intervals of 1 s): refused, holder named.
  write_record(tmp_path, heartbeat=time.time())
  with pytest.raises(WorkdirLockedError, match='pid 4242 on host tpu-host-7'):
    workdir_lib.lock(str(tmp_path), backend='heartbeat', heartbeat_s=0.1).acquire()
  # Stale (10 intervals old): taken over.
  write_record(tmp_path, heartbeat=time.time() - 10.0)
  assert workdir_lib.read_holder(str(tmp_path), backend='heartbeat') is None
  with workdir_lib.lock(str(tmp_path), backend='heartbeat', heartbeat_s=0.1) as held:
    assert read_record(tmp_path)['pid'] == os.getpid() == held.holder.pid


def test_heartbeat_holder_notices_a_take_over(tmp_path):
  held = workdir_lib.lock(str(tmp_path), backend='heartbeat', heartbeat_s=0.05).acquire()
  held.check()  # still ours
  # Another trainer judged this one dead and wrote its own record.
  write_record(tmp_path, heartbeat=time.time() + 3600.0, token='intruder')

  def lost():
    try:
      held.check()
    except WorkdirLockedError as e:
      return str(e)
    return None

  msg = wait_for(lost, 'the lost lock')
  assert 'lost the lock' in msg and 'pid 4242 on host tpu-host-7' in msg
  held.release()
  assert read_record(tmp_path)['token'] == 'intruder'  # never removes another's file


def test_backend_choice():
  with pytest.raises(ValueError, match='flock cannot lock the remote path'):
    workdir_lib.lock('gs://bucket/run', backend='flock')
  with pytest.raises(ValueError, match="backend must be 'auto'"):
    workdir_lib.lock('/tmp/x', backend='nfs')
  assert workdir_lib.lock('gs://bucket/run').backend == 'heartbeat'
  assert workdir_lib.lock('/tmp/x').backend == 'flock'
