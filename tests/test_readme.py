"""The README's commands are the ones CI runs, and its API example runs."""

import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  return open(os.path.join(REPO, 'README.md')).read()


def _quickstart_commands():
  section = _readme().split('## Quickstart', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```bash\n(.*?)\n```', section, flags=re.S)


def test_quickstart_has_exactly_two_commands():
  commands = _quickstart_commands()
  assert len(commands) == 2
  assert all('\n' not in c for c in commands)
  assert 'experiments/digits.py' in commands[0] and 'pip install' in commands[0]
  assert 'pytest' in commands[1] and '[test]' in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
  ci = open(os.path.join(REPO, '.ci', 'run')).read()
  assert _quickstart_commands()[1] in ci.splitlines()


def test_api_example_runs():
  block = _readme().split('## Using the library', 1)[1].split('```python\n', 1)[1]
  code = block.split('```', 1)[0]
  # Same code, at a CI-sized resolution and width.
  code = code.replace("variant='F0')", "variant='F0', width=0.0625, group_size=8)")
  code = code.replace('192, 192', '32, 32').replace('64, 64', '32, 32')
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert np.isfinite(np.asarray(namespace['out']['logits'])).all()
  cost = namespace['nfnet_jax'].count_flops('F0', 256)
  assert round(cost.macs / 1e9, 2) == 12.38 and cost.params == 71_489_284
