"""nfnet_jax.convert: the command line (absl flags, dashed names, one-line errors)."""

import os
import re
import subprocess
import sys

from nfnet_jax import convert as convert_cli
from nfnet_jax import weights
from tests.weights.helpers import (
  NARROW,
  NUM_CLASSES,
  Call,
  Glob,
  assert_trees_equal,
  model_tree,
  payload_bytes,
  released_bytes,
  write,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WROTE = re.compile(
  r'^wrote (?P<dst>.+): NFNet-F0, (?P<arrays>\d+) arrays, '
  r'(?P<values>[\d,]+) parameters, md5 (?P<md5>[0-9a-f]{32})$'
)


def test_cli(tmp_path, capsys):
  tree = model_tree('F0', seed=5)
  src = write(tmp_path / 'src.pkl', released_bytes(tree))
  dst = tmp_path / 'out.npz'
  args = [
    '--variant',
    'F0',
    '--num-classes',
    str(NUM_CLASSES),
    '--width',
    '0.0625',
    '--group-size',
    '8',
    '--no-verify-md5',
    str(src),
    str(dst),
  ]
  assert convert_cli.main(args) == 0
  out = capsys.readouterr().out
  assert 'NFNet-F0' in out
  match = WROTE.match(out.strip())
  assert match and match['dst'] == str(dst) and match['md5'] == weights.file_md5(dst)
  assert int(match['arrays']) == sum(len(p) for p in tree.values())
  assert int(match['values'].replace(',', '')) == sum(
    v.size for p in tree.values() for v in p.values()
  )
  assert_trees_equal(tree, weights.load_pretrained(dst, 'F0', NUM_CLASSES, **NARROW))
  assert convert_cli.main(args) == 1
  assert 'already exists' in capsys.readouterr().err
  assert convert_cli.main(args + ['--overwrite']) == 0
  # Flags of an earlier run do not leak into the next (no --overwrite here).
  assert convert_cli.main(args) == 1
  hostile = write(tmp_path / 'evil.pkl', payload_bytes(Call(Glob('os', 'system'), 'true')))
  assert convert_cli.main(['--variant', 'F0', str(hostile), str(tmp_path / 'e.npz')]) == 1
  assert 'os.system' in capsys.readouterr().err
  assert not (tmp_path / 'e.npz').exists()


def test_cli_needs_src_and_dst(tmp_path, capsys):
  assert convert_cli.main(['--variant', 'F0', str(tmp_path / 'a')]) == 1
  assert 'expected SRC and DST' in capsys.readouterr().err
  assert convert_cli.main(['--variant', 'F0', '--no-such-flag', 'a', 'b']) == 2


def test_the_real_command_line(tmp_path):
  """`python -m nfnet_jax.convert` in a process of its own: the output line, the exit
  status, and one `error:` line for a bad input."""
  src = write(tmp_path / 'src.pkl', released_bytes(model_tree('F0', seed=6)))
  dst = tmp_path / 'out.npz'

  def convert(*args):
    return subprocess.run(
      [
        sys.executable,
        '-m',
        'nfnet_jax.convert',
        '--num-classes',
        str(NUM_CLASSES),
        '--width=0.0625',
        '--group_size',
        '8',
        '--no-verify-md5',
        *args,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )

  ok = convert('--variant', 'NFNet-F0', str(src), str(dst))
  assert ok.returncode == 0, ok.stderr
  assert WROTE.match(ok.stdout.strip()), ok.stdout
  again = convert(str(src), str(dst))
  assert again.returncode == 1
  errors = [line for line in again.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'already exists' in errors[0], again.stderr
  assert 'Traceback' not in again.stderr
  unknown = convert('--variant', 'ResNet18', str(src), str(tmp_path / 'x.npz'))
  assert unknown.returncode == 1 and "error: Unknown variant 'ResNet18'" in unknown.stderr
  assert not (tmp_path / 'x.npz').exists()
