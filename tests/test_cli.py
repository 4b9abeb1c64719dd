"""nfnet_jax.cli: the flag handling every tool shares."""

from absl import flags
import pytest

from nfnet_jax import cli


def _define(values):
  flags.DEFINE_integer('batch_per_device', 1, 'help', flag_values=values)
  flags.DEFINE_string('name', None, 'help', required=True, flag_values=values)


def test_dashed_and_underscored_flag_names_are_the_same_flag():
  seen = []
  work = lambda f, positional: seen.append((f.batch_per_device, f.name, positional))
  assert cli.run(work, _define, ['--batch-per-device=3', '--name', 'x'], takes_positional=True) == 0
  argv = ['--batch_per_device', '4', '--name=y', 'a', '--', '--b-c']
  assert cli.run(work, _define, argv, takes_positional=True) == 0
  assert seen == [(3, 'x', []), (4, 'y', ['a', '--b-c'])]


def test_normalize_argv_touches_flag_names_only():
  assert cli.normalize_argv(['prog', '--top-k=3', '--class-index=my-dir', 'my-file', '-v']) == [
    'prog',
    '--top_k=3',
    '--class_index=my-dir',
    'my-file',
    '-v',
  ]


def test_bad_flags_and_stray_arguments_exit_2_with_one_line(capsys):
  work = lambda f, positional: 0
  assert cli.run(work, _define, ['--name=x', '--batch-per-device=two']) == 2
  assert cli.run(work, _define, []) == 2  # --name is required
  assert cli.run(work, _define, ['--name=x', 'stray']) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 3 and all(line.startswith('error: ') for line in err)
  assert 'stray' in err[2]


def test_user_errors_are_one_line_and_verbose_shows_the_traceback(capsys):
  def work(f, positional):
    raise ValueError('the file is not a weights file: convert it first')

  assert cli.run(work, _define, ['--name=x'], user_errors=(ValueError,)) == 1
  assert capsys.readouterr().err == 'error: the file is not a weights file: convert it first\n'
  with pytest.raises(ValueError, match='convert it first'):
    cli.run(work, _define, ['--name=x', '--verbose'], user_errors=(ValueError,))
  with pytest.raises(ValueError):  # not declared a user error: a real bug, shown whole
    cli.run(work, _define, ['--name=x'])


def test_a_tool_runs_twice_in_one_process():
  values = []
  for n in (1, 2):
    cli.run(
      lambda f, p: values.append(f.batch_per_device),
      _define,
      [f'--batch-per-device={n}', '--name=x'],
    )
  assert values == [1, 2]


def test_help_prints_the_tools_docstring_and_flags(capsys):
  assert cli.run(lambda f, p: 1 / 0, _define, ['--help']) == 0
  out = capsys.readouterr().out
  assert out.startswith(__doc__.strip()) and '--batch_per_device' in out and '--name' in out
