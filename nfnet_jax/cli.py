"""What every command-line tool shares: absl flags, dashed flag names, one-line errors.

Each tool defines its flags with absl (`flags.DEFINE_*`, underscores in the names) in a
`define_flags()` function and its work in `main(argv)`, then calls `cli.run(main,
define_flags)`. `--batch-per-device` and `--batch_per_device` are then the same flag.
A `UserError` (bad input the user can fix; each tool may name more exception types)
prints one line and exits with status 1; `--verbose` shows the traceback as well.
"""
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags


class UserError(Exception):
  """Bad input: printed as one line (the problem and the fix), without a traceback."""


def _dashes_to_underscores(arg: str) -> str:
  if not arg.startswith('--') or arg == '--':
    return arg
  name, eq, value = arg[2:].partition('=')
  return '--' + name.replace('-', '_') + eq + value


def normalize_argv(argv: Sequence[str]) -> list[str]:
  """`--batch-per-device=8` -> `--batch_per_device=8` (flag names only, up to `--`)."""
  out, positional = [], False
  for arg in argv:
    positional = positional or arg == '--'
    out.append(arg if positional else _dashes_to_underscores(arg))
  return out


def run(main: Callable[[list[str]], Optional[int]], define_flags: Callable[[], None],
        argv: Optional[Sequence[str]] = None,
        user_errors: tuple[type[BaseException], ...] = (UserError,)) -> None:
  """Defines the tool's flags, parses `argv` (default: sys.argv) and calls `main`.

  Exceptions of the `user_errors` types are printed as one line (exit status 1).
  """
  define_flags()
  if 'verbose' not in flags.FLAGS:
    flags.DEFINE_bool('verbose', False, 'Show the traceback of errors.')

  def guarded(args):
    try:
      return main(args)
    except user_errors as e:
      if flags.FLAGS.verbose:
        raise
      print(f'error: {e}', file=sys.stderr)
      return 1

  app.run(guarded, argv=normalize_argv(sys.argv if argv is None else argv))
