"""The NFNet optimizer step and parameter EMA as one native pass on XLA:CPU.

`optim.sgd_agc` is an optax chain: AGC, coupled weight decay, Nesterov momentum, the
learning rate; the train step then adds the update to the parameters and blends them into
their EMA. On XLA's CPU backend each of the new parameters, momentum and EMA is its own
loop that reads the leaves again, about 0.2 s of the F0 step at batch 8, 128 px on 2
cores (docs/benchmarks.md, "Seventh round"). `native/fused_sgd.cc` does the same
arithmetic, in the chain's order, reading each leaf once and writing the three results in
place, on XLA's own CPU threads (an XLA FFI custom call).

The C++ source ships with the package and is compiled at first use with the host's C++
compiler against the headers jaxlib ships (`jax.ffi.include_dir()`), into
`$NFNET_JAX_CACHE_DIR` (default `$XDG_CACHE_HOME/nfnet_jax` or `~/.cache/nfnet_jax`). The
file name carries a hash of the source, jaxlib's version, the compiler and the CPU's
features, so a cache shared between machines never loads code built for another; a build
goes to a temporary file that is renamed into place, so concurrent first uses are safe.
Where no compiler works, or with `NFNET_JAX_NATIVE=0`, or on any other backend (TPU, GPU)
the train step runs the optax chain: same arithmetic, same state tree, so checkpoints move
freely between the two (tests/test_fused_sgd.py holds them equal).
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnet_jax import optim

OPT_OUT = 'NFNET_JAX_NATIVE'
CACHE_ENV = 'NFNET_JAX_CACHE_DIR'
TARGET = 'nfnet_fused_sgd'
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'native', 'fused_sgd.cc')
# -ffp-contract=off: no fused multiply-adds; each operation of the chain rounds on its own,
# as in its float32 definition (results then agree with XLA's to a few ulps).
FLAGS = ('-O3', '-march=native', '-ffp-contract=off', '-std=c++17', '-shared', '-fPIC', '-w')
_BUILD_TIMEOUT_S = 300

PyTree = optim.PyTree


def cache_dir() -> str:
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'nfnet_jax')


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get('CXX', 'c++'))


def _cpu_features() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line
  except OSError:
    pass
  return platform.processor()


def library_path(compiler: str) -> str:
  """Where the library built by `compiler` for this source, jaxlib and CPU lives."""
  version = subprocess.run(
    [compiler, '--version'], capture_output=True, text=True, timeout=60
  ).stdout.splitlines()[:1]
  key = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    key.update(f.read())
  key.update(f'jaxlib {importlib.metadata.version("jaxlib")}'.encode())
  key.update(repr((compiler, version, FLAGS, platform.machine(), _cpu_features())).encode())
  return os.path.join(cache_dir(), f'fused_sgd-{key.hexdigest()[:16]}.so')


def build(compiler: str, path: str) -> None:
  """Compiles the source into `path`, atomically: a temporary file renamed into place."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.build-', suffix='.so')
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, '-I', jax.ffi.include_dir(), SOURCE, '-o', tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    if done.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed: {done.stderr.strip()[-2000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def open_library(compiler: str) -> ctypes.CDLL:
  """The kernel's shared library for this source, jaxlib and CPU: from the cache, else
  built into it (a damaged cached file is built again). Raises OSError or RuntimeError."""
  path = library_path(compiler)
  if os.path.exists(path):
    try:
      return ctypes.CDLL(path)
    except OSError:  # Truncated or overwritten: build it again below.
      pass
  build(compiler, path)
  return ctypes.CDLL(path)


@functools.cache
def load() -> bool:
  """Builds (once per cache) and registers the CPU kernel; False where it cannot be had.

  The reason goes to the log once; training then runs the optax chain.
  """
  compiler = _compiler()
  if compiler is None:
    logging.warning(
      'No C++ compiler (%s) for the fused CPU optimizer step: using the optax chain, '
      'about 6%% slower per F0 step on CPU. Install g++ or set CXX.',
      os.environ.get('CXX', 'c++'),
    )
    return False
  try:
    lib = open_library(compiler)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NfnetFusedSgd), platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    logging.warning('Fused CPU optimizer step unavailable (%s): using the optax chain.', e)
    return False
  return True


class Hyperparams(NamedTuple):
  """`optim.sgd_agc`'s arguments after the learning rate (same order and meaning)."""

  momentum: float
  nesterov: bool
  weight_decay: float
  clipping: Optional[float]
  eps: float

  @classmethod
  def from_config(cls, opt) -> 'Hyperparams':
    """From a `config.optimizer` whose `name` is 'sgd_agc'."""
    return cls(opt.momentum, opt.nesterov, opt.weight_decay, opt.clipping, opt.eps)


def agc_scales(
  grads: PyTree, params: PyTree, clipping: Optional[float], eps: float, mask: PyTree
) -> list:
  """Per leaf, the factor AGC multiplies each unit's gradient by, flattened over the
  units: 1 where `||G_i|| < clipping * max(||W_i||, eps)` (or the leaf is masked out),
  else `clipping * max(||W_i||, eps) / max(||G_i||, 1e-6)`, as `optax.adaptive_grad_clip`
  (so `grad * scale` is its output exactly). Length 1 for a leaf that is one unit."""
  scales = []
  for g, p, m in zip(jax.tree.leaves(grads), jax.tree.leaves(params), jax.tree.leaves(mask)):
    axes = optim._unit_reduction_axes(p.shape)
    units = int(np.prod([d for a, d in enumerate(p.shape) if a not in axes], dtype=np.int64))
    if not clipping or not m:
      scales.append(jnp.ones((units,), jnp.float32))
      continue
    g_norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes)).reshape(units)
    max_norm = clipping * jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(p), axis=axes)), eps)
    max_norm = max_norm.reshape(units)
    scale = max_norm / jnp.maximum(g_norm, 1e-6)
    scales.append(jnp.where(g_norm < max_norm, jnp.ones_like(scale), scale))
  return scales


def make_update(
  hyper: Hyperparams, schedule: optax.Schedule, ema_max_decay: float
) -> Optional[Callable]:
  """The fused optimizer step, or None where the train step should run the optax chain
  (not a CPU backend, a build that failed, `NFNET_JAX_NATIVE=0`, no momentum).

  The returned `update(grads, opt_state, params, ema_params, step)` gives
  `(new_params, new_opt_state, new_ema_params, update_norm)`: what
  `optim.sgd_agc(schedule, *hyper)`'s `update`, `optax.apply_updates`,
  `optim.ema_update(..., step, ema_max_decay)` and `optim.update_norm` give, with the
  same opt_state tree. It returns None instead (at trace time) unless `opt_state` is that
  chain's state and every parameter, momentum and EMA leaf is float32.
  """
  if os.environ.get(OPT_OUT) == '0' or jax.default_backend() != 'cpu' or not hyper.momentum:
    return None
  if not load():
    return None

  reference = optim.sgd_agc(schedule, *hyper)

  def update(grads, opt_state, params, ema_params, step):
    # Traced once per compilation: anything but sgd_agc's state over float32 leaves
    # (another optimizer, bfloat16 master weights) takes the optax chain.
    expected = jax.eval_shape(reference.init, params)
    if jax.tree.structure(opt_state) != jax.tree.structure(expected):
      return None
    leaves, treedef = jax.tree.flatten(params)
    trace = optax.tree_utils.tree_get(opt_state, 'trace')
    count = optax.tree_utils.tree_get(opt_state, 'count')
    if any(
      jnp.result_type(x) != jnp.float32
      for x in leaves + jax.tree.leaves(ema_params) + jax.tree.leaves(trace)
    ):
      return None
    wd_mask = optim.weight_decay_mask(params)
    wd = [hyper.weight_decay if m else 0.0 for m in jax.tree.leaves(wd_mask)]
    scales = agc_scales(grads, params, hyper.clipping, hyper.eps, optim.agc_mask(params))
    scalars = jnp.stack(
      [
        jnp.asarray(schedule(count), jnp.float32),
        optim.ema_decay(step, ema_max_decay).astype(jnp.float32),
      ]
    )
    ins = [scalars]
    for g, p, m, e, s in zip(
      jax.tree.leaves(grads),
      leaves,
      treedef.flatten_up_to(trace),
      treedef.flatten_up_to(ema_params),
      scales,
    ):
      ins += [jnp.asarray(g, jnp.float32), p, m, e, s]
    n = len(leaves)
    out_types = [jax.ShapeDtypeStruct((), jnp.float32)]
    for p in leaves:
      out_types += [jax.ShapeDtypeStruct(p.shape, jnp.float32)] * 3
    # Operand 1 + 5i + k (p, m, e of leaf i) is written in place as result 1 + 3i + k - 1.
    aliases = {1 + 5 * i + k: 1 + 3 * i + (k - 1) for i in range(n) for k in (1, 2, 3)}
    outs = jax.ffi.ffi_call(TARGET, out_types, input_output_aliases=aliases)(
      *ins,
      momentum=np.float32(hyper.momentum),
      nesterov=bool(hyper.nesterov),
      weight_decay=np.asarray(wd, np.float32),
    )
    update_sq, rest = outs[0], outs[1:]
    new_params = treedef.unflatten(rest[0::3])
    new_trace = treedef.unflatten(rest[1::3])
    new_ema = treedef.unflatten(rest[2::3])
    opt_state = optax.tree_utils.tree_set(
      opt_state, trace=new_trace, count=optax.safe_increment(count)
    )
    return new_params, opt_state, new_ema, jnp.sqrt(update_sq)

  return update
