"""How a run was made: the code, the packages, the command and the devices.

`run_header()` gathers them as a JSON-ready dict and `format_header()` turns it into a few
lines for the console. The trainer prints it at every start and appends it, with the
step the run starts from and its resolved config, as one line of
``<workdir>/runs.jsonl`` (`append_run_record`): a resumed run adds a line and never
rewrites an earlier one, so a workdir keeps the history of every process that trained
it. `nfnet-train --mode eval` and the benchmark print the same header.

The source's git commit is read with `git` (a short timeout; nothing here may fail or
stall a run): a package installed from a wheel, or a machine without git, gives
``commit: None`` and says why.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import jax

from nfnet_jax import fileio, hostmem

RUNS_FILE = 'runs.jsonl'
GIT_TIMEOUT_S = 5.0

# Shown name -> the distributions that provide it (the first one installed counts).
# Read from the installed metadata, so TensorFlow is not imported just to name it.
PACKAGES = {
  'nfnet_jax': ('nfnet_jax', 'nfnet-jax'),
  'jax': ('jax',),
  'jaxlib': ('jaxlib',),
  'haiku': ('dm-haiku',),
  'optax': ('optax',),
  'orbax': ('orbax-checkpoint',),
  'tensorflow': ('tensorflow', 'tensorflow-cpu', 'tensorflow-macos', 'tf-nightly'),
  'tfds': ('tensorflow-datasets', 'tfds-nightly'),
  'numpy': ('numpy',),
}


def package_versions() -> dict[str, Optional[str]]:
  """The installed version of each of `PACKAGES` (None if absent), and Python's."""
  versions = {}
  for name, dists in PACKAGES.items():
    versions[name] = None
    for dist in dists:
      try:
        versions[name] = importlib.metadata.version(dist)
        break
      except importlib.metadata.PackageNotFoundError:
        continue
  versions['python'] = platform.python_version()
  return versions


def _git(args: Sequence[str], cwd: str, timeout: float) -> str:
  """`git args` in `cwd`; its whole process group is killed after `timeout` seconds (a
  child it started could otherwise hold the pipes open and stall the run)."""
  env = dict(os.environ, GIT_OPTIONAL_LOCKS='0', LC_ALL='C')  # a read never locks the index
  proc = subprocess.Popen(
    ['git', *args],
    cwd=cwd,
    env=env,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    raise
  if proc.returncode:
    raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
  return out.strip()


def git_state(path: Optional[str] = None, timeout: Optional[float] = None) -> dict[str, Any]:
  """{'commit', 'dirty', 'root', 'note'} of the git checkout holding `path` (default: this
  package's source). `commit` and `dirty` are None, and `note` says why, when `path` is
  not tracked in a checkout (a pip install, even inside some other repository) or git is
  missing, refuses the directory or takes longer than `timeout` seconds in all
  (default `GIT_TIMEOUT_S`). `dirty`: a tracked file differs from the commit (untracked files,
  such as workdirs, do not count).
  """
  path = os.path.abspath(path or os.path.dirname(__file__))
  timeout = GIT_TIMEOUT_S if timeout is None else timeout
  deadline = time.monotonic() + timeout  # for all the git calls together
  git = lambda *args: _git(args, directory, max(deadline - time.monotonic(), 0.01))
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  state = {'commit': None, 'dirty': None, 'root': None, 'note': None}
  if shutil.which('git') is None:
    return {**state, 'note': 'git is not installed'}
  try:
    if not git('ls-files', '--', path):
      state['note'] = 'not a git checkout'
      return state
    state['root'] = git('rev-parse', '--show-toplevel')
    state['commit'] = git('rev-parse', 'HEAD')
    state['dirty'] = bool(git('status', '--porcelain', '--untracked-files=no'))
  except subprocess.TimeoutExpired:
    state['note'] = f'git took more than {timeout:g} s'
  except subprocess.CalledProcessError as e:
    # Outside any repository, or one git refuses (e.g. another user's: "dubious ownership").
    lines = (e.stderr or '').strip().splitlines() or [f'exit status {e.returncode}']
    outside = 'not a git repository' in lines[-1]
    state['note'] = 'not a git checkout' if outside else f'git failed: {lines[-1]}'
  except OSError as e:  # e.g. `path` does not exist
    state['note'] = f'git failed: {e}'
  if state['note']:
    state['commit'] = state['dirty'] = state['root'] = None
  return state


def device_summary() -> dict[str, Any]:
  """The backend, the device kind and how many devices this process and the job have."""
  local = jax.local_devices()
  return {
    'platform': jax.default_backend(),
    'kind': local[0].device_kind if local else None,
    'local': len(local),
    'global': jax.device_count(),
    'process_index': jax.process_index(),
    'process_count': jax.process_count(),
  }


def run_header(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """The command line (`argv`, default `sys.argv`), package versions, git state of the
  source, devices and host: what it takes to tell how a run was made."""
  return {
    'argv': list(sys.argv if argv is None else argv),
    'versions': package_versions(),
    'source': {'path': os.path.dirname(os.path.abspath(__file__)), **git_state()},
    'devices': device_summary(),
    'host': socket.gethostname(),
    'host_memory': hostmem.describe(),
  }


def format_header(header: dict[str, Any]) -> str:
  """A few readable lines of `run_header()`'s dict."""
  versions, source, dev = header['versions'], header['source'], header['devices']
  if source.get('commit'):
    where = f'git {source["commit"][:12]}{", dirty" if source.get("dirty") else ""}'
  else:
    where = source.get('note') or 'commit unknown'
  others = ', '.join(f'{k} {v or "-"}' for k, v in versions.items() if k != 'nfnet_jax')
  devices = (
    f'{dev["local"]} x {dev["kind"]} ({dev["platform"]}) on process {dev["process_index"]} of '
    f'{dev["process_count"]}, {dev["global"]} in all; host {header.get("host")}'
  )
  argv = header.get('argv') or []
  return '\n'.join(
    (
      f'nfnet_jax {versions.get("nfnet_jax") or "-"} from {source["path"]} ({where})',
      f'command: {shlex.join(argv) if argv else "-"}',
      f'devices: {devices}',
      f'versions: {others}',
      f'host memory: {header.get("host_memory") or "-"}',
    )
  )


def append_run_record(
  workdir: str,
  header: dict[str, Any],
  *,
  start_step: int,
  config: dict,
  config_changes: Sequence[str] = (),
) -> dict[str, Any]:
  """Appends one line to ``<workdir>/runs.jsonl``: the time, the step this start resumes
  from, the config changes accepted since the last start, the resolved config and
  `header`. Earlier lines are kept as they were; the file is rewritten whole (as gs://
  needs), so a reader never sees a partial line. Call it from one process only."""
  record = {
    'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'start_step': int(start_step),
    'config_changes': list(config_changes),
    **header,
    'config': config,
  }
  path = os.path.join(workdir, RUNS_FILE)
  old = fileio.read_text(path) if fileio.exists(path) else ''
  if old and not old.endswith('\n'):
    old += '\n'
  fileio.atomic_write_text(path, old + json.dumps(record) + '\n')
  return record


def read_run_records(workdir: str) -> list[dict[str, Any]]:
  """The records of `append_run_record`, oldest first ([] for a workdir without any)."""
  path = os.path.join(workdir, RUNS_FILE)
  if not fileio.exists(path):
    return []
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]
