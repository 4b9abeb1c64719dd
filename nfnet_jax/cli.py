"""What every command-line tool shares: absl flags, dashed flag names, one-line errors.

A tool defines its flags in `define_flags(flag_values)` (absl `flags.DEFINE_*` with
`flag_values=`, underscores in the names) and its work in a function of the parsed
flags and the positional arguments; `main(argv=None)` is then
`cli.run(work, define_flags, argv)`, which parses into a fresh `FlagValues` (so a tool
can be called more than once in one process, as tests do) and returns the exit status.
`--batch-per-device` and `--batch_per_device` are the same flag. Exceptions of the
types the tool names (bad input the user can fix) print one line and give status 1;
`--verbose` shows the traceback instead. The trainer, which needs absl's app (logging,
multi-host start-up), parses the global flags with `app.run` and the same `normalize_argv`.
"""

import sys
from typing import Callable, Optional, Sequence

from absl import flags


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


def wants_help(args: Sequence[str]) -> bool:
  """Whether the flags (before a `--`) ask for help."""
  flags_part = args[: args.index('--')] if '--' in args else args
  return bool({'--help', '-h', '--helpshort', '--helpfull'} & set(flags_part))


def usage(doc: Optional[str], values: flags.FlagValues) -> str:
  """A tool's module docstring (its commands and what it does), then its flags."""
  return f'{(doc or "").strip()}\n\nFlags:\n{values.get_help()}'


def run(
  work: Callable[[flags.FlagValues, list[str]], Optional[int]],
  define_flags: Callable[[flags.FlagValues], None],
  argv: Optional[Sequence[str]] = None,
  user_errors: tuple[type[BaseException], ...] = (UserError,),
  takes_positional: bool = False,
) -> int:
  """Parses `argv` (default: sys.argv[1:]) with the tool's flags and calls
  `work(flag_values, positional_args)`; returns the exit status (its return value, 0
  by default; 1 for one of `user_errors`; 2 for bad flags, or for positional arguments
  given to a tool that `takes_positional` none). `--help` prints the tool's module
  docstring and its flags."""
  values = flags.FlagValues()
  args = normalize_argv(['nfnet_jax', *(sys.argv[1:] if argv is None else argv)])
  flags.DEFINE_bool('verbose', False, 'Show the traceback of errors.', flag_values=values)
  saved, sys.argv = sys.argv, args
  try:  # ml_collections' config flags find their `--config.x=` overrides in sys.argv
    define_flags(values)
    if wants_help(args):
      print(usage(sys.modules[work.__module__].__doc__, values))
      return 0
    positional = values(args)[1:]
    values.validate_all_flags()
    if positional and not takes_positional:
      raise flags.Error(f'unexpected arguments {positional}: every option is a --flag')
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    sys.argv = saved
  try:
    return work(values, positional) or 0
  except user_errors as e:
    if values.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 1
