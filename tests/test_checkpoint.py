"""Tests for nfnet_jax.checkpoint."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnet_jax import checkpoint as ckpt_lib
from nfnet_jax.checkpoint import Checkpointer, CheckpointMismatchError

SIG = {
  'family': 'NFNet',
  'variant': 'F0',
  'width': 1.0,
  'num_classes': 10,
  'image_size': 192,
  'stages': [1, 2, 6, 3],
}


def make_params(seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    'nfnet/~/stem_conv0': {'w': f(3, 3, 3, 8), 'b': f(8)},
    'nfnet/~/nf_block_0/~/conv0': {
      'w': jnp.asarray(rng.standard_normal((1, 1, 8, 4)), jnp.bfloat16),
      'gain': f(1, 1, 1, 4),
    },
    'nfnet/~/nf_block_0': {'skip_gain': f()},
    'nfnet/~/linear': {'w': f(8, num_classes), 'b': f(num_classes)},
  }


def make_state(step=0, seed=0, num_classes=10):
  params = make_params(seed, num_classes)
  opt = optax.chain(optax.trace(0.9, nesterov=True), optax.scale(-0.1))
  opt_state = opt.init(params)
  # Non-trivial optimizer state: one update step.
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  _, opt_state = opt.update(grads, opt_state, params)
  ema = jax.tree.map(lambda p: p * 0.5, params)
  return {
    'step': jnp.asarray(step, jnp.int32),
    'params': params,
    'opt_state': opt_state,
    'ema_params': ema,
    'rng': jax.random.PRNGKey(seed + 17),
  }


def zeros_like(state):
  return jax.tree.map(jnp.zeros_like, state)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def snapshot(root):
  """{relative path: bytes (None for dirs)} for everything under root."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = None
    for f in filenames:
      p = os.path.join(dirpath, f)
      out[os.path.relpath(p, root)] = pathlib.Path(p).read_bytes()
  return out


def test_round_trip_nesterov_state_and_rng(tmp_path):
  state = make_state(step=5, seed=1)
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(5, state)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 5
    restored = ckpt.restore(zeros_like(state))
  assert_trees_equal(restored, state)
  # NamedTuples (TraceState / EmptyState) survive, leaves are jax arrays.
  assert isinstance(restored['opt_state'][0], optax.TraceState)
  assert isinstance(restored['opt_state'][1], optax.EmptyState)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
  assert restored['rng'].dtype == jnp.uint32 and restored['rng'].shape == (2,)
  # Layout.
  assert (tmp_path / 'model_signature.json').is_file()
  assert (tmp_path / 'checkpoints' / '5' / 'state').is_dir()
  assert (tmp_path / 'checkpoints' / '5' / 'signature' / 'model_signature.json').is_file()


def test_numpy_target_masked_state_typed_key_python_step(tmp_path):
  params = make_params()
  mask = jax.tree.map(lambda p: p.ndim > 1, params)
  opt = optax.chain(optax.masked(optax.trace(0.9, nesterov=True), mask), optax.scale(-0.1))
  state = {'step': 3, 'params': params, 'opt_state': opt.init(params), 'rng': jax.random.key(42)}
  with Checkpointer(str(tmp_path), model_signature=SIG, async_save=False) as ckpt:
    assert ckpt.save(3, state)
    target = jax.tree.map(lambda x: x, state)
    target['params'] = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), params)
    target['step'] = 0
    target['rng'] = jax.random.key(0)
    restored = ckpt.restore(target)
  assert restored['step'] == 3 and isinstance(restored['step'], int)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored['params']))
  assert jax.dtypes.issubdtype(restored['rng'].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
    jax.random.key_data(restored['rng']), jax.random.key_data(state['rng'])
  )
  assert jax.tree.structure(restored['opt_state']) == jax.tree.structure(state['opt_state'])
  for x, y in zip(jax.tree.leaves(restored['opt_state']), jax.tree.leaves(state['opt_state'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_max_to_keep_interval_latest_and_resume(tmp_path):
  ckpt = Checkpointer(str(tmp_path), model_signature=SIG, max_to_keep=2, save_interval_steps=2)
  saved = [
    s for s in range(1, 8) if ckpt.should_save(s) and ckpt.save(s, make_state(step=s, seed=s))
  ]
  assert saved == [2, 4, 6]
  assert not ckpt.should_save(6)  # saved already
  assert ckpt.save(7, make_state(step=7, seed=7))  # the final save, off the interval
  # A final save at an already-saved step is a no-op, not an error.
  assert not ckpt.save(7, make_state(step=7, seed=7))
  ckpt.close()
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [6, 7]

  # Resume with a fresh Checkpointer (new process in real life).
  ckpt = Checkpointer(
    str(tmp_path), model_signature=dict(SIG), max_to_keep=2, save_interval_steps=2
  )
  assert ckpt.latest_step() == 7
  restored = ckpt.restore(zeros_like(make_state()))
  assert_trees_equal(restored, make_state(step=7, seed=7))
  assert_trees_equal(ckpt.restore(zeros_like(make_state()), step=6), make_state(step=6, seed=6))
  with pytest.raises(FileNotFoundError):
    ckpt.restore(zeros_like(make_state()), step=2)  # rotated out
  assert not ckpt.save(7, make_state(step=7))
  assert ckpt.save(8, make_state(step=8, seed=8))
  ckpt.close()
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == [
    7,
    8,
  ]


def test_restore_without_checkpoint_raises(tmp_path):
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
      ckpt.restore(make_state())


def test_different_model_signature_refused_and_workdir_untouched(tmp_path):
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    ckpt.save(1, make_state(step=1))
  before = snapshot(tmp_path)

  other = dict(SIG, variant='F1', num_classes=1000)
  with pytest.raises(CheckpointMismatchError) as info:
    Checkpointer(str(tmp_path), model_signature=other)
  msg = str(info.value)
  assert "variant: stored 'F0', requested 'F1'" in msg
  assert 'num_classes: stored 10, requested 1000' in msg
  assert 'width' not in msg  # only differing fields are listed
  assert '--workdir' in msg and 'delete' in msg
  assert snapshot(tmp_path) == before

  # A field only on one side is reported too.
  extra = dict(SIG, drop_rate=0.2)
  with pytest.raises(CheckpointMismatchError, match='drop_rate'):
    Checkpointer(str(tmp_path), model_signature=extra)
  assert snapshot(tmp_path) == before

  # Signature file lost: the copy stored with each checkpoint is used.
  (tmp_path / 'model_signature.json').unlink()
  before = snapshot(tmp_path)
  with pytest.raises(CheckpointMismatchError, match='variant'):
    Checkpointer(str(tmp_path), model_signature=other)
  assert snapshot(tmp_path) == before

  # The right model may still use it (lists vs tuples compare equal).
  same = dict(SIG, stages=(1, 2, 6, 3))
  with Checkpointer(str(tmp_path), model_signature=same) as ckpt:
    assert ckpt.latest_step() == 1
  assert (tmp_path / 'model_signature.json').is_file()


def test_signature_only_workdir_refused(tmp_path):
  Checkpointer(str(tmp_path), model_signature=SIG).close()
  before = snapshot(tmp_path)
  with pytest.raises(CheckpointMismatchError, match='width: stored 1.0, requested 2.0'):
    Checkpointer(str(tmp_path), model_signature=dict(SIG, width=2.0))
  assert snapshot(tmp_path) == before


def test_foreign_checkpoints_without_signature_refused(tmp_path):
  (tmp_path / 'checkpoints' / '5' / 'state').mkdir(parents=True)
  (tmp_path / 'checkpoints' / '5' / 'state' / 'x').write_bytes(b'old run')
  before = snapshot(tmp_path)
  with pytest.raises(CheckpointMismatchError, match='(?s)no model signature.*--workdir'):
    Checkpointer(str(tmp_path), model_signature=SIG)
  assert snapshot(tmp_path) == before


def test_non_json_signature_rejected(tmp_path):
  with pytest.raises(TypeError, match='JSON'):
    Checkpointer(str(tmp_path), model_signature={'act': object()})
  assert not any(tmp_path.iterdir())


def test_shape_mismatch_names_path_and_shapes(tmp_path):
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    ckpt.save(1, make_state(step=1, num_classes=10))
    ckpt.wait_until_finished()
    with pytest.raises(CheckpointMismatchError) as info:
      ckpt.restore(zeros_like(make_state(num_classes=7)))
  msg = str(info.value)
  assert "['params']['nfnet/~/linear']['w']" in msg
  assert 'expected shape (8, 7), found (8, 10)' in msg
  assert "['params']['nfnet/~/linear']['b']" in msg
  assert 'expected shape (7,), found (10,)' in msg
  # Optimizer state and EMA params are checked too.
  assert "['opt_state'][0].trace['nfnet/~/linear']['w']" in msg
  assert "['ema_params']['nfnet/~/linear']['w']" in msg


def test_dtype_and_structure_mismatch(tmp_path):
  state = make_state(step=1)
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    bad = zeros_like(state)
    bad['params']['nfnet/~/stem_conv0']['w'] = jnp.zeros((3, 3, 3, 8), jnp.bfloat16)
    with pytest.raises(
      CheckpointMismatchError,
      match=r"(?s)stem_conv0'\]\['w'\]: expected dtype "
      'bfloat16, found float32',
    ):
      ckpt.restore(bad)
    bad = zeros_like(state)
    bad['params']['nfnet/~/new_layer'] = {'w': jnp.zeros((2,))}
    del bad['params']['nfnet/~/stem_conv0']
    with pytest.raises(CheckpointMismatchError) as info:
      ckpt.restore(bad)
  msg = str(info.value)
  assert "['params']['nfnet/~/new_layer']['w']" in msg and 'missing' in msg
  assert 'params/nfnet/~/stem_conv0/w: in the checkpoint but not' in msg


def test_leftover_tmp_dir_from_interrupted_save_is_ignored(tmp_path):
  state2 = make_state(step=2, seed=2)
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    ckpt.save(2, state2)
  # What a crash in the middle of saving step 4 leaves behind.
  tmp = tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-1712345678901234'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'manifest.ocdbt').write_bytes(b'\x00partial')

  ckpt = Checkpointer(str(tmp_path), model_signature=SIG)
  assert ckpt.latest_step() == 2
  assert_trees_equal(ckpt.restore(zeros_like(state2)), state2)
  # Saving step 4 again works and then wins.
  assert ckpt.save(4, make_state(step=4, seed=4))
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path), model_signature=SIG)
  assert ckpt.latest_step() == 4
  assert_trees_equal(ckpt.restore(zeros_like(state2)), make_state(step=4, seed=4))
  ckpt.close()
  assert not tmp.exists()  # cleaned up on start-up


def test_process_killed_during_async_save_keeps_previous(tmp_path):
  """Kill the process right after an async save starts (no finalisation)."""
  script = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {str(pathlib.Path(__file__).parents[1])!r})
      import numpy as np
      from nfnet_jax.checkpoint import Checkpointer
      sig = {SIG!r}
      ck = Checkpointer({str(tmp_path)!r}, model_signature=sig)
      ck.save(1, {{'step': np.int32(1), 'w': np.full((64, 64), 1.0, np.float32)}})
      ck.wait_until_finished()
      big = np.full((2048, 2048), 2.0, np.float32)  # 16 MB
      ck.save(2, {{'step': np.int32(2), 'w': big}})
      os._exit(3)  # no wait_until_finished, no close
  """)
  # Killed this early, the step-2 save is normally still in its
  # `2.orbax-checkpoint-tmp*` directory; if it did finish, step 2 is complete.
  # Either way the newest finalized step must restore cleanly.
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stderr[-3000:]
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    latest = ckpt.latest_step()
    assert latest in (1, 2)
    shape = (64, 64) if latest == 1 else (2048, 2048)
    restored = ckpt.restore({'step': np.int32(0), 'w': np.zeros(shape, np.float32)})
    assert int(restored['step']) == latest
    np.testing.assert_array_equal(restored['w'], float(latest))
    if latest == 2:  # the save finished before the kill: step 1 still there
      assert ckpt.all_steps() == [1, 2]


def test_class_index_written_once_and_a_changed_dataset_refused(tmp_path):
  workdir = tmp_path / 'work'
  classes = ('ant', 'bee', 'cat')
  ckpt_lib.check_and_write_class_index('folder', classes, str(workdir), write=False)
  assert not workdir.exists()  # a non-writing process leaves no trace
  ckpt_lib.check_and_write_class_index('folder', classes, str(workdir))
  path = workdir / ckpt_lib.CLASS_INDEX_FILE
  written = path.read_bytes()
  assert json.loads(written)['class_names'] == ['ant', 'bee', 'cat']
  assert ckpt_lib.read_class_index(str(workdir)) == ['ant', 'bee', 'cat']
  ckpt_lib.check_and_write_class_index('folder', classes, str(workdir))  # same: fine
  grown = ('ant', 'ape', 'bee', 'cat')
  with pytest.raises(ValueError, match=r"differ from label 1 on \(\['bee'\] vs \['ape'\]\)"):
    ckpt_lib.check_and_write_class_index('folder', grown, str(workdir))
  assert path.read_bytes() == written  # untouched


def test_module_constants():
  assert ckpt_lib.SIGNATURE_FILENAME == 'model_signature.json'
  assert ckpt_lib.CHECKPOINT_SUBDIR == 'checkpoints'


_MULTIHOST_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import jax
jax.config.update('jax_platforms', 'cpu')
jax.distributed.initialize('localhost:{port}', num_processes=2,
                           process_id=int(sys.argv[1]))
import jax.numpy as jnp, numpy as np, optax
from nfnet_jax.checkpoint import Checkpointer
params = {{'lin': {{'w': jnp.arange(12.).reshape(3, 4), 'b': jnp.ones(4)}}}}
opt = optax.chain(optax.trace(0.9, nesterov=True), optax.scale(-0.1))
state = {{'step': jnp.int32(4), 'params': params,
         'opt_state': opt.init(params), 'rng': jax.random.PRNGKey(1)}}
ck = Checkpointer({workdir!r}, model_signature={{'variant': 'F0'}},
                  save_interval_steps=2)
assert ck.save(4, state)
ck.wait_until_finished()
r = ck.restore(jax.tree.map(jnp.zeros_like, state))
assert ck.latest_step() == 4
assert float(r['params']['lin']['w'].sum()) == 66.0
ck.close()
print('OK', jax.process_index())
"""


def test_two_process_save_restore_on_cpu(tmp_path):
  """Both processes call save/restore with host-local (un-replicated) arrays,
  as in a multi-host job; neither hangs nor errors."""
  import socket

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  script = _MULTIHOST_SCRIPT.format(
    root=str(pathlib.Path(__file__).parents[1]), port=port, workdir=str(tmp_path / 'wd')
  )
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', script, str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=120))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-3000:]
    assert f'OK {i}' in out
  assert (tmp_path / 'wd' / 'checkpoints' / '4' / 'state').is_dir()
