"""The command-line tools re-execute themselves with glibc's huge-page tunable."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from nfnet_jax import hostmem
from tests import helpers

GLIBC = ('glibc', '2.36')
TOOL = ['/usr/bin/python3', '-m', 'nfnet_jax.train', '--config', 'experiments/digits.py']


@pytest.mark.parametrize(
  'environ, argv, libc, thp, want',
  [
    ({}, TOOL, GLIBC, 'madvise', 'glibc.malloc.hugetlb=1'),
    ({}, TOOL, GLIBC, 'always', 'glibc.malloc.hugetlb=1'),
    # A console script is a tool too.
    ({}, ['/v/bin/python', '/v/bin/nfnet-benchmark', '--mode=eval'], GLIBC, 'madvise', 'x'),
    # The user's own tunables are kept, and ours added after them.
    (
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
      TOOL,
      GLIBC,
      'madvise',
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1',
    ),
    # Already set, to any value (this is also what ends the re-execution): as started.
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, TOOL, GLIBC, 'madvise', None),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, TOOL, GLIBC, 'madvise', None),
    # The opt-out.
    ({'NFNET_JAX_HUGEPAGES': '0'}, TOOL, GLIBC, 'madvise', None),
    # Nothing to gain: THP off or absent, no such tunable before glibc 2.35, not glibc.
    ({}, TOOL, GLIBC, 'never', None),
    ({}, TOOL, GLIBC, '', None),
    ({}, TOOL, ('glibc', '2.31'), 'madvise', None),
    ({}, TOOL, ('', ''), 'madvise', None),
    # A library import (a script, -c, pytest, another package's -m) is never re-executed.
    ({}, ['/usr/bin/python3', 'my_script.py'], GLIBC, 'madvise', None),
    ({}, ['/usr/bin/python3', '-c', 'import nfnet_jax'], GLIBC, 'madvise', None),
    ({}, ['/usr/bin/python3', '-m', 'pytest', '-n', '2'], GLIBC, 'madvise', None),
    ({}, ['/usr/bin/python3'], GLIBC, 'madvise', None),
  ],
)
def test_when_a_process_is_re_executed(environ, argv, libc, thp, want):
  want = 'glibc.malloc.hugetlb=1' if want == 'x' else want
  assert hostmem.tunables_to_add(environ, argv, libc, thp) == want


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hostmem.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert hostmem.thp_mode(str(path)) == 'always'
  assert hostmem.thp_mode(str(tmp_path / 'absent')) == ''


def _supported() -> bool:
  name, version = platform.libc_ver()
  return (
    sys.platform == 'linux'
    and name == 'glibc'
    and tuple(map(int, version.split('.')[:2])) >= (2, 35)
    and hostmem.thp_mode() in ('always', 'madvise')
  )


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostmem.OPT_OUT)}
  return {**env, **extra}


def test_a_tool_runs_with_the_tunable_added_to_the_users():
  """End to end: a tool started without our tunable reports (in its run header) that it
  ran with the user's tunables plus ours."""
  tiny = ['-m', 'nfnet_jax.benchmark', *helpers.TINY_BENCHMARK_FLAGS]
  users = 'glibc.malloc.arena_max=4'
  got = subprocess.run(
    [sys.executable, *tiny], env=_env(GLIBC_TUNABLES=users), capture_output=True, text=True
  )
  assert got.returncode == 0, got.stderr[-2000:]
  want = f'{users}:glibc.malloc.hugetlb=1' if _supported() else users
  assert f'host memory: GLIBC_TUNABLES={want}, transparent huge pages' in got.stderr


def test_a_library_import_runs_as_started():
  code = 'import os, nfnet_jax; print(os.environ.get("GLIBC_TUNABLES", "unset"))'
  got = subprocess.run([sys.executable, '-c', code], env=_env(), capture_output=True, text=True)
  assert got.returncode == 0, got.stderr[-2000:]
  assert got.stdout.split() == ['unset']


# malloc'd and first touched in a fresh interpreter; prints the minor page faults per MiB.
_FAULTS = textwrap.dedent(
  """
  import ctypes, resource
  libc = ctypes.CDLL('libc.so.6')
  libc.malloc.restype = ctypes.c_void_p
  size = 64 << 20
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 64)
  """
)


def test_the_tunable_cuts_the_page_faults_of_a_large_buffer():
  """What the re-execution is for: a fresh 64 MiB block faults in 4 KiB pages (256 per
  MiB) by default, and in 2 MiB pages (about 0.5 per MiB) with the tunable."""

  def faults(**extra):
    out = subprocess.run(
      [sys.executable, '-c', _FAULTS], env=_env(**extra), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout)

  default = faults()
  huge = faults(GLIBC_TUNABLES='glibc.malloc.hugetlb=1')
  assert default > 200
  if _supported():
    assert huge < default / 8
  else:
    assert huge > 200
