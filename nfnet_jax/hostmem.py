r"""Transparent huge pages for the host's large buffers (glibc's `hugetlb` tunable).

XLA's CPU runtime allocates a step's temporaries as one block per call (about 0.9 GB for
the F0 train step at batch 8, 128 px) and frees it when the call returns. glibc serves a
block that large with a fresh `mmap`, so the kernel faults it in and zeroes it 4 KiB at a
time on every step: ~258,000 minor page faults; huge pages cut the step's wall time by 17%
on a 2-core Xeon (docs/benchmarks.md, "Fourth round"). glibc >= 2.35 has a tunable,
`glibc.malloc.hugetlb=1`, that marks such blocks for transparent huge pages
(`madvise(MADV_HUGEPAGE)`), so they fault 2 MiB at a time. Tunables are read when a
process starts, so the command-line tools (`python -m nfnet_jax.<tool>`, `nfnet-<tool>`)
re-execute themselves once with it set: same pid, same command line, before anything
else is imported. They do not where it would change nothing or where the user chose:

- `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb` (to any value);
- `NFNET_JAX_HUGEPAGES=0` is set (the opt-out);
- the C library is not glibc >= 2.35, or the kernel's transparent huge pages are off.

A program that imports `nfnet_jax` as a library is never re-executed; start it with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for the same effect. A run's header (`provenance`)
says what the process got.
"""

import os
import platform
import re
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'NFNET_JAX_HUGEPAGES'
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)  # the first release with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> str:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or '' where
  the kernel has none."""
  try:
    with open(path) as f:
      m = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return ''
  return m.group(1) if m else ''


def is_tool_command(orig_argv: Sequence[str]) -> bool:
  """Whether the interpreter was started to run one of this package's commands:
  `python -m nfnet_jax.<tool>` or an `nfnet-<tool>` console script."""
  args = list(orig_argv[1:])
  if len(args) >= 2 and args[0] == '-m':
    return args[1].startswith('nfnet_jax.')
  return bool(args) and os.path.basename(args[0]).startswith('nfnet-')


def tunables_to_add(
  environ: Mapping[str, str],
  orig_argv: Sequence[str],
  libc: tuple[str, str],
  thp: str,
) -> Optional[str]:
  """The `GLIBC_TUNABLES` value to re-execute with, or None to run as started.

  `libc` is `platform.libc_ver()`, `thp` is `thp_mode()`."""
  existing = environ.get('GLIBC_TUNABLES', '')
  if environ.get(OPT_OUT) == '0' or TUNABLE in existing:
    return None
  if not is_tool_command(orig_argv) or thp not in ('always', 'madvise'):
    return None
  name, version = libc
  try:
    if name != 'glibc' or tuple(int(v) for v in version.split('.')[:2]) < _MIN_GLIBC:
      return None
  except ValueError:
    return None
  return f'{existing}:{TUNABLE}=1' if existing else f'{TUNABLE}=1'


def reexec_with_huge_pages() -> None:
  """Replaces this process by itself with `glibc.malloc.hugetlb=1` where
  `tunables_to_add` says so; returns (doing nothing) otherwise."""
  orig_argv = getattr(sys, 'orig_argv', None)
  if not orig_argv or sys.platform != 'linux':
    return
  value = tunables_to_add(os.environ, orig_argv, platform.libc_ver(), thp_mode())
  if value is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=value)
  try:
    os.execve(sys.executable, [sys.executable, *orig_argv[1:]], env)
  except OSError:
    return  # the interpreter cannot be re-run (a frozen binary, say): run as started


def describe() -> str:
  """One line for a run's header: the tunables this process started with and the
  kernel's huge page mode."""
  tunables = os.environ.get('GLIBC_TUNABLES')
  return (
    f'GLIBC_TUNABLES={tunables}' if tunables else 'GLIBC_TUNABLES unset'
  ) + f', transparent huge pages {thp_mode() or "not available"}'
