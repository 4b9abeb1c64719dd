"""A fake `gcloud` that simulates Cloud TPU VM slices and a GCS bucket, for the launch/ tests.

tests/test_launch.py puts this directory first on PATH (the `gcloud` next to this file runs
this module) and points FAKE_GCLOUD_DIR at a directory of its own, which holds:

* `calls.jsonl`: every invocation's argv, one JSON list per line, in order;
* `state.json`: the simulated world, which the test writes and reads:
  - `workers`: hosts per slice (4, like a v4-32 or a v3-32);
  - `nodes`: slice name -> {`state` (READY, PREEMPTED, ...), `setup` (the install stamp
    that launch/setup_tpu.sh leaves on every worker, or None), `training` (None, or the run
    on it: `status` running/exited, `code`, `args`, `polls`, `run`), ...};
  - `script`: what happens to the n-th training started, one entry per start:
    {`after_polls`: N, `then`: finish | preempt | crash | unreachable | never}. After N
    `describe` calls of its slice (the supervisor's polls) the run finishes (writes
    `params_ema.npz` into the workdir and exits 0), its slice is preempted, it exits with
    code 1, or its slice stays READY but no ssh reaches it any more. A start beyond the
    script finishes after 1 poll;
  - `create_failures`, `describe_errors`, `start_failures`: how many of the next creates
    fail for lack of capacity, describes with a transient API error, training starts with
    an ssh error;
  - `starts`: each training start as the workers got it (settings and training args);
* `gcs/`: the buckets; gs://BUCKET/PATH is `gcs/BUCKET/PATH`;
* `scp/`: the files copied to the workers.

Only what launch/ uses is simulated, with gcloud's argument rules for it (an unknown flag or
a remote command this fake does not know is an error, so the tests notice drift). Nothing
here sleeps or touches the network.
"""

import json
import os
import pathlib
import shlex
import shutil
import sys

VALUE_FLAGS = {
  '--project',
  '--zone',
  '--accelerator-type',
  '--version',
  '--runtime-version',
  '--node-id',
  '--worker',
  '--command',
  '--format',
}
# The flags each command accepts (beyond its positional arguments).
ALLOWED = {
  ('tpu-vm', 'create'): {
    '--project',
    '--zone',
    '--accelerator-type',
    '--version',
    '--spot',
    '--preemptible',
  },
  ('tpu-vm', 'describe'): {'--project', '--zone', '--format'},
  ('tpu-vm', 'delete'): {'--project', '--zone', '--quiet'},
  ('tpu-vm', 'scp'): {'--project', '--zone', '--worker'},
  ('tpu-vm', 'ssh'): {'--project', '--zone', '--worker', '--command'},
  ('queued-resources', 'create'): {
    '--project',
    '--zone',
    '--node-id',
    '--accelerator-type',
    '--runtime-version',
    '--spot',
  },
  ('queued-resources', 'delete'): {'--project', '--zone', '--force', '--quiet'},
}
DEFAULT_STATE = {
  'workers': 4,
  'nodes': {},
  'script': [],
  'create_failures': 0,
  'describe_errors': 0,
  'start_failures': 0,
  'starts': [],
}


class Fail(Exception):
  """gcloud's error exit: the message goes to stderr."""

  def __init__(self, message, code=1):
    super().__init__(message)
    self.code = code


def parse(args, allowed):
  """Splits args into positionals, flags and what follows `--`, as gcloud's parser would."""
  positional, flags, rest = [], {}, []
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == '--':
      rest = args[i + 1 :]
      break
    if arg.startswith('--'):
      name, eq, value = arg.partition('=')
      if name not in allowed:
        raise Fail(f'ERROR: (gcloud) unrecognized arguments: {arg}', 2)
      if name in VALUE_FLAGS and not eq:
        if i + 1 >= len(args):
          raise Fail(f'ERROR: (gcloud) argument {name}: expected one argument', 2)
        i += 1
        value = args[i]
      elif name not in VALUE_FLAGS:
        if eq:
          raise Fail(f'ERROR: (gcloud) argument {name}: ignored explicit argument', 2)
        value = True
      if name in flags:
        raise Fail(f'ERROR: (gcloud) argument {name}: given twice', 2)
      flags[name] = value
    else:
      positional.append(arg)
    i += 1
  for required in ('--project', '--zone'):
    if required in allowed and required not in flags:
      raise Fail(f'ERROR: (gcloud) argument {required} is required here', 2)
  return positional, flags, rest


def gcs_path(root, url):
  if not url.startswith('gs://') or len(url) <= len('gs://'):
    raise Fail(f'ERROR: (gcloud.storage.ls) Invalid URL: {url}', 1)
  return root / 'gcs' / url[len('gs://') :].rstrip('/')


def hosts(state, worker):
  names = [f't1v-n-fake-w-{i}' for i in range(state['workers'])]
  if worker == 'all':
    return names
  if not worker.isdigit() or int(worker) >= len(names):
    raise Fail(f'ERROR: (gcloud.compute.tpus.tpu-vm.ssh) Invalid worker: {worker}', 2)
  return [names[int(worker)]]


def node_of(state, name, flags, command):
  node = state['nodes'].get(name)
  if node is None:
    raise Fail(
      f'ERROR: (gcloud.compute.tpus.tpu-vm.{command}) NOT_FOUND: Resource '
      f"'projects/{flags['--project']}/locations/{flags['--zone']}/nodes/{name}' was not found"
    )
  if (node['project'], node['zone']) != (flags['--project'], flags['--zone']):
    raise Fail(f'ERROR: (gcloud.compute.tpus.tpu-vm.{command}) NOT_FOUND: {name} is elsewhere')
  return node


def reachable(state, name, flags, command):
  node = node_of(state, name, flags, command)
  if node['state'] != 'READY' or node.get('unreachable'):
    # What ssh to a preempted (stopped) VM looks like: gcloud gives up connecting.
    raise Fail(f'ssh: connect to host {name}: Connection timed out', 255)
  return node


def tick(root, state, node):
  """One poll of a slice: the training on it moves on by its script."""
  training = node.get('training')
  if node['state'] != 'READY' or not training or training['status'] != 'running':
    return
  training['polls'] += 1
  script = state['script']
  event = script[training['run']] if training['run'] < len(script) else {}
  if training['polls'] < event.get('after_polls', 1):
    return
  then = event.get('then', 'finish')
  if then == 'finish':
    workdir = training['args'][training['args'].index('--workdir') + 1]
    marker = gcs_path(root, workdir) / 'params_ema.npz'
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(b'fake export')
    training.update(status='exited', code=0)
  elif then == 'preempt':
    node['state'] = 'PREEMPTED'
    training.update(status='exited', code=143)
  elif then == 'crash':
    training.update(status='exited', code=1)
  elif then == 'unreachable':
    node['unreachable'] = True
  elif then != 'never':
    raise Fail(f'fake gcloud: unknown script event {then!r}', 3)


def remote(root, state, node, host_names, command):
  """Runs one remote command of launch/ on the given workers, by what it is for."""
  training = node.get('training')
  running = bool(training) and training['status'] == 'running'
  out = []
  if 'nfnet_jax_setup.sh' in command:  # launch/setup_tpu.sh: the install
    words = shlex.split(command)
    if words[:2] != ['bash', 'nfnet_jax_setup.sh'] or len(words) != 9:
      raise Fail(f'fake gcloud: unexpected setup command {command!r}', 3)
    if not node.get('copied'):
      raise Fail('bash: nfnet_jax_setup.sh: No such file or directory', 127)
    commit, jax_version = words[2], words[3]
    node['setup'] = f'commit={commit} jax={jax_version} packages=0123456789abcdef'
    devices = 4 * state['workers']
    for host in host_names:
      out.append(f'[{host}] jax {jax_version}: {devices} devices in the slice, 4 on this worker')
  elif 'NFNET_SETUP' in command:  # setup_tpu.sh's check, and train_tpu.sh's before a start
    for host in host_names:
      if running and 'NFNET_BUSY' in command:
        out.append(f'NFNET_BUSY {host}')
      out.append(f'NFNET_SETUP {node.get("setup") or "missing"}')
  elif 'NFNET_ALIVE' in command:  # launch/train_tpu.sh: --status, and the check after a start
    for host in host_names:
      if not training:
        out.append(f'NFNET_NONE {host}: no run was started here')
      elif running:
        cmdline = shlex.join(['/home/me/nfnet_venv/bin/python', '-m', 'nfnet_jax.train'])
        out.append(f'NFNET_ALIVE {host}: 4242 {cmdline} {shlex.join(training["args"])}')
      elif training['code'] == 0:
        out.append(f'NFNET_DONE {host}')
      else:
        out.append(f'NFNET_DEAD {host}, last lines of its log:')
        out.append(f'[nfnet_jax.train exited with code {training["code"]}]')
  elif 'pkill' in command:  # launch/train_tpu.sh --stop
    for host in host_names:
      out.append(f'[{host}] stopped' if running else f'[{host}] no run')
    if running:
      # The trainer saves a checkpoint on SIGTERM and exits non-zero.
      training.update(status='exited', code=143)
  elif 'nohup' in command and 'nfnet_jax.train' in command:  # launch/train_tpu.sh: the start
    words = shlex.split(command)
    if words[:2] != ['bash', '-c'] or words[3] != 'nfnet_train':
      raise Fail(f'fake gcloud: unexpected start command {command!r}', 3)
    if host_names != hosts(state, 'all'):
      raise Fail('fake gcloud: a training started on some workers only would hang', 3)
    if running:
      raise Fail('fake gcloud: the TPU is in use by another training run', 1)
    if state['start_failures'] > 0:
      state['start_failures'] -= 1
      raise Fail(f'ssh: connect to host {host_names[-1]}: Connection reset by peer', 255)
    repo, venv, logs, run_id, tfds, *args = words[4:]
    state['starts'].append(
      {
        'node': node['name'],
        'setup': node.get('setup'),
        'repo': repo,
        'venv': venv,
        'logs': logs,
        'run_id': run_id,
        'tfds': tfds,
        'args': args,
      }
    )
    node['training'] = {
      'run': len(state['starts']) - 1,
      'status': 'running',
      'code': None,
      'polls': 0,
      'args': args,
    }
    for host in host_names:
      out.append(f'[{host}] started (log: /home/me/{logs}/train-{run_id}-{host}.log)')
  elif 'latest.log' in command:  # launch/tail_logs.sh
    for host in host_names:
      out.append(f'[{host}] step 100/1000 loss=1.234')
  else:
    raise Fail(f'fake gcloud: unknown remote command {command!r}', 3)
  return out


def tpu_vm(root, state, verb, args):
  if ('tpu-vm', verb) not in ALLOWED:
    raise Fail(f'fake gcloud: unsupported command tpu-vm {verb}', 3)
  positional, flags, rest = parse(args, ALLOWED[('tpu-vm', verb)])
  if verb == 'scp':
    *sources, destination = positional
    name = destination.partition(':')[0]
    node = reachable(state, name, flags, verb)
    if flags.get('--worker') != 'all':
      raise Fail('fake gcloud: launch/ copies to every worker', 3)
    (root / 'scp').mkdir(exist_ok=True)
    for source in sources:
      shutil.copy(source, root / 'scp' / pathlib.Path(source).name)
    node['copied'] = True
    return []
  if len(positional) != 1:
    raise Fail(f'ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) one TPU name, got {positional}', 2)
  name = positional[0]
  if verb == 'create':
    if '--spot' in flags and '--preemptible' in flags:
      raise Fail(
        'ERROR: (gcloud.compute.tpus.tpu-vm.create) --spot and --preemptible '
        'cannot be given together',
        2,
      )
    if name in state['nodes']:
      raise Fail(f'ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: {name}')
    if state['create_failures'] > 0:
      state['create_failures'] -= 1
      raise Fail(
        'ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is '
        'no more capacity in the zone'
      )
    capacity = 'spot' if '--spot' in flags else 'preemptible' if '--preemptible' in flags else ''
    state['nodes'][name] = {
      'name': name,
      'state': 'READY',
      'project': flags['--project'],
      'zone': flags['--zone'],
      'accelerator_type': flags.get('--accelerator-type', 'v2-8'),
      'version': flags.get('--version'),
      'capacity': capacity or 'on-demand',
      'setup': None,
      'training': None,
      'copied': False,
    }
    return []
  if verb == 'describe':
    if state['describe_errors'] > 0:
      state['describe_errors'] -= 1
      raise Fail('ERROR: (gcloud.compute.tpus.tpu-vm.describe) UNAVAILABLE: try again')
    node = node_of(state, name, flags, verb)
    tick(root, state, node)
    if flags.get('--format') != 'value(state)':
      raise Fail('fake gcloud: describe knows only --format=value(state)', 3)
    return [node['state']]
  if verb == 'delete':
    node_of(state, name, flags, verb)
    if not flags.get('--quiet'):
      raise Fail('fake gcloud: delete would prompt; these tests have no terminal', 3)
    del state['nodes'][name]
    return []
  # ssh
  node = reachable(state, name, flags, verb)
  if '--command' not in flags:
    raise Fail('fake gcloud: interactive ssh is not simulated', 3)
  if rest not in ([], ['-t']):
    raise Fail(f'fake gcloud: unexpected ssh arguments {rest}', 3)
  return remote(root, state, node, hosts(state, flags.get('--worker', '0')), flags['--command'])


def dispatch(root, state, argv):
  if argv[:3] == ['compute', 'tpus', 'tpu-vm'] and len(argv) > 3:
    return tpu_vm(root, state, argv[3], argv[4:])
  if argv[:3] == ['compute', 'tpus', 'queued-resources'] and len(argv) > 3:
    verb = argv[3]
    if ('queued-resources', verb) not in ALLOWED:
      raise Fail(f'fake gcloud: unsupported command queued-resources {verb}', 3)
    parse(argv[4:], ALLOWED[('queued-resources', verb)])
    return []
  if argv[:2] == ['storage', 'ls'] and len(argv) == 3:
    if not gcs_path(root, argv[2]).exists():
      raise Fail('ERROR: (gcloud.storage.ls) One or more URLs matched no objects.')
    return [argv[2]]
  raise Fail(f'fake gcloud: unsupported command {argv}', 3)


def main(argv):
  root = pathlib.Path(os.environ['FAKE_GCLOUD_DIR'])
  with open(root / 'calls.jsonl', 'a') as f:
    f.write(json.dumps(argv) + '\n')
  state_file = root / 'state.json'
  state = dict(DEFAULT_STATE)
  if state_file.exists():
    state.update(json.loads(state_file.read_text()))
  try:
    out = dispatch(root, state, argv)
    code = 0
  except Fail as e:
    out, code = [], e.code
    print(e, file=sys.stderr)
  # Saved on errors too: a failed create still uses up one of `create_failures`.
  state_file.write_text(json.dumps(state, indent=1))
  for line in out:
    print(line)
  return code


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
