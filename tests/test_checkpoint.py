"""Tests for nfnet_jax.checkpoint."""

import errno
import json
import logging
import os
import pathlib
import shutil
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

# A damaged newest step: both processes fall back to step 4 together, and
# process 0 alone moves step 6 aside.
from orbax.checkpoint import multihost
import glob, os
state6 = dict(state, step=jnp.int32(6))
assert ck.save(6, state6)
ck.wait_until_finished()
if jax.process_index() == 0:
  for path in glob.glob({workdir!r} + '/checkpoints/6/state/**/d/*', recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
multihost.sync_global_processes('test_damaged')
r = ck.restore(jax.tree.map(jnp.zeros_like, state))
assert int(r['step']) == 4, int(r['step'])
assert ck.all_steps() == [4], ck.all_steps()
assert [p.split('-')[0] for p in os.listdir({workdir!r} + '/checkpoints_damaged')] == ['6']
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


# ---------------------------------------------------------------------------
# A damaged newest checkpoint: fall back to the one before it.
# ---------------------------------------------------------------------------


def make_big_state(step):
  """A state whose 256x256 array is stored in its own data file (random values
  do not compress, so OCDBT does not inline them into its b-tree nodes)."""
  rng = np.random.default_rng(step)
  return {
    'step': np.int32(step),
    'w': rng.standard_normal((256, 256)).astype(np.float32),
    'b': np.arange(10, dtype=np.float32) * step,
  }


def big_target():
  return {'step': np.int32(0), 'w': np.zeros((256, 256), np.float32), 'b': np.zeros(10, np.float32)}


@pytest.fixture(scope='module')
def three_steps(tmp_path_factory):
  """A workdir with finalized steps 1, 2, 3, copied by each test that damages it."""
  workdir = tmp_path_factory.mktemp('three_steps') / 'wd'
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make_big_state(step))
  return workdir


def copy_workdir(src, tmp_path):
  dst = tmp_path / 'wd'
  shutil.copytree(src, dst)
  return dst


def state_files(workdir, step):
  root = workdir / 'checkpoints' / str(step) / 'state'
  return [pathlib.Path(d) / f for d, _, files in os.walk(root) for f in files]


def largest_data_file(workdir, step):
  return max(
    (p for p in state_files(workdir, step) if p.parent.name == 'd'), key=lambda p: p.stat().st_size
  )


def truncate(path, size=None):
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size // 2 if size is None else size)


def overwrite_with_garbage(path):
  data = np.random.default_rng(7).integers(0, 256, max(path.stat().st_size, 64), np.uint8)
  path.write_bytes(data.tobytes())


# (how step 3 is damaged, what the warning must say about it)
DAMAGES = {
  'truncated_array_data': (lambda wd: truncate(largest_data_file(wd, 3), 100), 'OUT_OF_RANGE'),
  'garbage_over_every_data_file': (
    lambda wd: [overwrite_with_garbage(p) for p in state_files(wd, 3) if p.parent.name == 'd'],
    'checkpoints/3/state',
  ),
  'truncated_manifest': (
    lambda wd: truncate(wd / 'checkpoints' / '3' / 'state' / 'manifest.ocdbt'),
    'manifest.ocdbt',
  ),
  'garbage_metadata': (
    lambda wd: overwrite_with_garbage(wd / 'checkpoints' / '3' / 'state' / '_METADATA'),
    'unreadable metadata',
  ),
  'missing_metadata': (
    lambda wd: (wd / 'checkpoints' / '3' / 'state' / '_METADATA').unlink(),
    '_METADATA',
  ),
  'missing_state_dir': (
    lambda wd: shutil.rmtree(wd / 'checkpoints' / '3' / 'state'),
    'state is missing',
  ),
}


def damage_warnings(caplog):
  return [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
  three_steps, tmp_path, caplog, damage
):
  workdir = copy_workdir(three_steps, tmp_path)
  damage_fn, expected = DAMAGES[damage]
  damage_fn(workdir)
  damaged_before = snapshot(workdir / 'checkpoints' / '3')

  ckpt = Checkpointer(str(workdir), model_signature=SIG)
  assert ckpt.latest_step() == 3  # it looks finalized: only reading it shows the damage
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore(big_target())
  assert_trees_equal(restored, make_big_state(2))

  # One warning line, naming the step and what is wrong with it.
  (warning,) = damage_warnings(caplog)
  assert '\n' not in warning
  assert warning.startswith(f'Checkpoint step 3 in {workdir / "checkpoints"} is damaged (')
  assert expected in warning
  assert 'restored step 2 instead' in warning

  # Step 3 is out of Orbax's view and moved aside whole, not deleted.
  assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
  assert not (workdir / 'checkpoints' / '3').exists()
  (aside,) = (workdir / 'checkpoints_damaged').iterdir()
  assert aside.name.startswith('3-') and str(aside) in warning
  assert snapshot(aside) == damaged_before

  # The run continues: step 3 can be saved again and wins.
  assert ckpt.save(3, make_big_state(30))
  ckpt.close()
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    assert_trees_equal(ckpt.restore(big_target()), make_big_state(30))


def test_two_damaged_steps_are_both_set_aside(three_steps, tmp_path, caplog):
  workdir = copy_workdir(three_steps, tmp_path)
  truncate(largest_data_file(workdir, 3), 100)
  overwrite_with_garbage(workdir / 'checkpoints' / '2' / 'state' / '_METADATA')
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    with caplog.at_level(logging.WARNING):
      assert_trees_equal(ckpt.restore(big_target()), make_big_state(1))
    assert ckpt.all_steps() == [1]
  warnings = damage_warnings(caplog)
  assert [w.split(' in ')[0] for w in warnings] == ['Checkpoint step 3', 'Checkpoint step 2']
  assert sorted(p.name.split('-')[0] for p in (workdir / 'checkpoints_damaged').iterdir()) == [
    '2',
    '3',
  ]


def test_every_step_damaged_raises_listing_them_and_moves_nothing(three_steps, tmp_path):
  workdir = copy_workdir(three_steps, tmp_path)
  for step in (1, 2, 3):
    truncate(largest_data_file(workdir, step), 100)
  before = snapshot(workdir)
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointDamagedError) as info:
      ckpt.restore(big_target())
    assert ckpt.all_steps() == [1, 2, 3]
  msg = str(info.value)
  assert '\n' not in msg
  for step in (3, 2, 1):
    assert f'step {step}: OUT_OF_RANGE' in msg
  assert 'nothing was moved' in msg and 'backup' in msg
  assert snapshot(workdir) == before


def test_an_explicitly_requested_damaged_step_raises_and_stays(three_steps, tmp_path):
  workdir = copy_workdir(three_steps, tmp_path)
  truncate(workdir / 'checkpoints' / '3' / 'state' / 'manifest.ocdbt')
  before = snapshot(workdir)
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match=r'checkpoints/3 is damaged \('):
      ckpt.restore(big_target(), step=3)
    assert_trees_equal(ckpt.restore(big_target(), step=2), make_big_state(2))
  assert snapshot(workdir) == before


def test_a_damaged_step_that_cannot_be_moved_stops_the_restore(three_steps, tmp_path):
  """Moving aside fails for real (a file where the directory must go): one clear
  error, and the damaged step is still in place."""
  workdir = copy_workdir(three_steps, tmp_path)
  truncate(largest_data_file(workdir, 3), 100)
  (workdir / 'checkpoints_damaged').write_text('in the way')
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointDamagedError) as info:
      ckpt.restore(big_target())
    assert ckpt.all_steps() == [1, 2, 3]
  msg = str(info.value)
  assert '\n' not in msg
  assert 'Checkpoint step 3' in msg and 'moving it aside' in msg and 'by hand' in msg
  assert (workdir / 'checkpoints' / '3' / 'state').is_dir()


def test_a_mismatch_is_not_damage(three_steps, tmp_path):
  """A target of another shape raises CheckpointMismatchError and moves nothing,
  even past a damaged newest step."""
  workdir = copy_workdir(three_steps, tmp_path)
  truncate(largest_data_file(workdir, 3), 100)
  before = snapshot(workdir)
  target = big_target()
  target['w'] = np.zeros((128, 256), np.float32)
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    with pytest.raises(CheckpointMismatchError, match=r'expected shape \(128, 256\)'):
      ckpt.restore(target)
  assert snapshot(workdir) == before


# ---------------------------------------------------------------------------
# Read-only use (evaluation while a trainer writes).
# ---------------------------------------------------------------------------


def listing(root):
  """{relative path: (is dir, size, mtime_ns)} for everything under root."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.lstat(path)
      out[os.path.relpath(path, root)] = (os.path.isdir(path), st.st_size, st.st_mtime_ns)
  return out


def test_read_only_restore_leaves_the_trainers_files_alone(three_steps, tmp_path):
  workdir = copy_workdir(three_steps, tmp_path)
  # The trainer's save of step 4, in flight.
  inflight = workdir / 'checkpoints' / '4.orbax-checkpoint-tmp-1712345678901234'
  (inflight / 'state').mkdir(parents=True)
  (inflight / 'state' / 'manifest.ocdbt').write_bytes(b'\x00partial')
  before = listing(workdir)

  ckpt = Checkpointer(str(workdir), model_signature=SIG, read_only=True)
  assert ckpt.read_only and ckpt.latest_step() == 3 and not ckpt.should_save(5)
  assert_trees_equal(ckpt.restore(big_target()), make_big_state(3))
  with pytest.raises(RuntimeError, match='read-only'):
    ckpt.save(5, make_big_state(5))
  ckpt.close()
  assert listing(workdir) == before
  assert (inflight / 'state' / 'manifest.ocdbt').read_bytes() == b'\x00partial'


def test_read_only_skips_a_damaged_step_without_moving_it(three_steps, tmp_path, caplog):
  workdir = copy_workdir(three_steps, tmp_path)
  truncate(largest_data_file(workdir, 3), 100)
  before = listing(workdir)
  with Checkpointer(str(workdir), model_signature=SIG, read_only=True) as ckpt:
    with caplog.at_level(logging.WARNING):
      assert_trees_equal(ckpt.restore(big_target()), make_big_state(2))
  (warning,) = damage_warnings(caplog)
  assert 'Checkpoint step 3' in warning and 'left step 3 in place (read-only)' in warning
  assert listing(workdir) == before


@pytest.mark.parametrize('exists', [False, True])
def test_read_only_on_an_unused_workdir_creates_nothing(tmp_path, exists):
  workdir = tmp_path / 'wd'
  if exists:
    workdir.mkdir()
  with Checkpointer(str(workdir), model_signature=SIG, read_only=True) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
      ckpt.restore(big_target())
  assert sorted(os.listdir(tmp_path)) == (['wd'] if exists else [])
  assert not exists or not any(workdir.iterdir())


def test_read_only_still_checks_the_model_signature(three_steps, tmp_path):
  workdir = copy_workdir(three_steps, tmp_path)
  before = listing(workdir)
  with pytest.raises(CheckpointMismatchError, match="variant: stored 'F0', requested 'F1'"):
    Checkpointer(str(workdir), model_signature=dict(SIG, variant='F1'), read_only=True)
  assert listing(workdir) == before


# ---------------------------------------------------------------------------
# A failed save stops the run.
# ---------------------------------------------------------------------------

_FAILING_SAVE_SCRIPT = """
import json, resource, signal, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from nfnet_jax.checkpoint import Checkpointer, CheckpointSaveError

ckpt = Checkpointer({workdir!r}, model_signature={sig!r}, async_save={async_save!r})
ckpt.save(1, {{'step': np.int32(1), 'w': np.full((256, 256), 1.0, np.float32)}})
ckpt.wait_until_finished()
# Every write past 256 KiB now fails with EFBIG (SIGXFSZ ignored, so the write
# returns the error instead of killing the process), as a full disk would.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
big = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # 1 MiB
out = {{'checks': 0}}
try:
  ckpt.save(2, {{'step': np.int32(2), 'w': big}})
  out['save_returned'] = True
  deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
  while time.monotonic() < deadline:
    ckpt.check_saves()  # what the training loop calls every step
    out['checks'] += 1
    time.sleep(0.01)
except CheckpointSaveError as e:
  out['error'] = str(e)
again = []
for call in (ckpt.check_saves, lambda: ckpt.save(3, {{'w': big}}), ckpt.wait_until_finished):
  try:
    call()
    again.append(False)
  except CheckpointSaveError as e:
    again.append(str(e) == out.get('error'))
out['raised_again'] = again
out['latest_step'] = ckpt.latest_step()
ckpt.close()  # reported already: does not raise it again
print('RESULT', json.dumps(out))
"""


@pytest.mark.parametrize('async_save', [True, False])
def test_a_failed_save_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path, async_save):
  workdir = tmp_path / 'wd'
  script = _FAILING_SAVE_SCRIPT.format(
    root=str(pathlib.Path(__file__).parents[1]),
    workdir=str(workdir),
    sig=SIG,
    async_save=async_save,
  )
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')]
  out = json.loads(line[len('RESULT ') :])

  assert 'error' in out, f'no CheckpointSaveError was raised: {out}'
  msg = out['error']
  assert '\n' not in msg
  assert msg.startswith(
    f'Saving the checkpoint for step 2 to {workdir / "checkpoints" / "2"} failed'
  )
  assert 'File too large (EFBIG)' in msg  # the operating system's error
  assert f'newest complete checkpoint is step 1 ({workdir / "checkpoints" / "1"})' in msg
  assert 'rerun the same command to resume from step 1' in msg
  if not async_save:
    assert 'save_returned' not in out  # a synchronous save raises itself
  assert out['raised_again'] == [True, True, True]
  assert out['latest_step'] == 1

  # On disk: step 2 never became a checkpoint; step 1 is intact.
  names = os.listdir(workdir / 'checkpoints')
  assert '2' not in names and '1' in names
  assert any(n.startswith('2.orbax-checkpoint-tmp') for n in names)
  with Checkpointer(str(workdir), model_signature=SIG, read_only=True) as ckpt:
    assert ckpt.all_steps() == [1]
    restored = ckpt.restore({'step': np.int32(0), 'w': np.zeros((256, 256), np.float32)})
  assert int(restored['step']) == 1 and np.all(restored['w'] == 1.0)
  # After the fix, the same command resumes and saves step 2.
  with Checkpointer(str(workdir), model_signature=SIG) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.save(2, {'step': np.int32(2), 'w': np.full((256, 256), 2.0, np.float32)})
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']


def test_a_full_disk_is_named_with_its_fix(tmp_path):
  """The message for ENOSPC, from a real write to /dev/full."""
  with pytest.raises(OSError) as info:
    with open('/dev/full', 'wb', buffering=0) as f:
      f.write(b'x' * 4096)
  assert info.value.errno == errno.ENOSPC
  ckpt = Checkpointer(str(tmp_path), model_signature=SIG, async_save=False)
  ckpt.save(1, make_big_state(1))
  error = ckpt._save_failed(2, info.value)
  msg = str(error)
  assert 'failed: No space left on device (ENOSPC)' in msg
  assert 'free space on that file system' in msg and 'resume from step 1' in msg
  with pytest.raises(ckpt_lib.CheckpointSaveError):
    ckpt.check_saves()
  ckpt.close()


# ---------------------------------------------------------------------------
# The optimizer changed, not the model.
# ---------------------------------------------------------------------------


def test_optimizer_only_mismatch_says_the_optimizer_differs(tmp_path):
  state = make_state(step=1)  # Nesterov momentum: a trace per parameter
  with Checkpointer(str(tmp_path), model_signature=SIG) as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    for opt in (
      optax.chain(optax.scale(-0.1)),  # momentum off: no optimizer arrays at all
      optax.adam(1e-3),  # another optimizer: other arrays
    ):
      target = zeros_like(state)
      target['opt_state'] = opt.init(state['params'])
      with pytest.raises(CheckpointMismatchError) as info:
        ckpt.restore(target)
      msg = str(info.value)
      assert 'written with a different optimizer' in msg
      assert 'all in the optimizer state `opt_state`' in msg
      assert 'optimizer.name' in msg and 'momentum on/off' in msg and 'clipping on/off' in msg
      assert f'--config.init_from={tmp_path}/params_ema.npz' in msg
      assert 'different model configuration' not in msg
      assert "['opt_state'][0].trace['nfnet/~/linear']['w']" in msg or 'opt_state/0/trace' in msg

    # The parameters differ too: the model message, as before.
    target = zeros_like(make_state(num_classes=7))
    target['opt_state'] = optax.adam(1e-3).init(target['params'])
    with pytest.raises(CheckpointMismatchError, match='different model configuration'):
      ckpt.restore(target)
