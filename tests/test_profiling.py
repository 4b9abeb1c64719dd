"""Profiling a window of training steps, and the transfer guard over the training loop."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from nfnet_jax import train
from tests.test_train import tiny_config


def traced_steps(log_dir: str) -> list[int]:
  """The `step_num` of every 'train' step annotation in the traces under `log_dir`, read
  from the XSpace protos the profiler wrote (independently of the code that wrote them)."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  found = []
  for path in glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True):
    with open(path, 'rb') as f:
      space = xplane_pb2.XSpace.FromString(f.read())
    for plane in space.planes:
      event_names = {k: v.name for k, v in plane.event_metadata.items()}
      stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
      for line in plane.lines:
        for event in line.events:
          if event_names.get(event.metadata_id) != 'train':
            continue
          found += [
            s.int64_value or s.uint64_value
            for s in event.stats
            if stat_names.get(s.metadata_id) == 'step_num'
          ]
  return sorted(found)


def _loop(profiler, steps, fail_at=None):
  """A training loop's use of the profiler, around a small jitted step."""
  step_fn = jax.jit(lambda x: jnp.tanh(x) + 1.0)
  x = jnp.zeros((4, 4))
  with profiler:
    for step in steps:
      with profiler.step(step):
        x = step_fn(x)
      profiler.step_done(step, x)
      if step == fail_at:
        raise KeyboardInterrupt


def test_profiler_traces_exactly_its_window(tmp_path):
  # Steps 3 and 4: the trace starts from the state after 2 steps.
  _loop(train.StepProfiler(str(tmp_path / 'window'), start_step=2, num_steps=2), range(1, 8))
  assert traced_steps(str(tmp_path / 'window')) == [3, 4]
  # A run resumed inside the window traces what is left of it.
  _loop(train.StepProfiler(str(tmp_path / 'resumed'), start_step=2, num_steps=3), range(5, 9))
  assert traced_steps(str(tmp_path / 'resumed')) == [5]
  # A window that reaches past the last step ends with the loop.
  _loop(train.StepProfiler(str(tmp_path / 'past'), start_step=3, num_steps=10), range(1, 6))
  assert traced_steps(str(tmp_path / 'past')) == [4, 5]
  # Off: num_steps=0, and every process but the first.
  _loop(train.StepProfiler(str(tmp_path / 'off'), start_step=0, num_steps=0), range(1, 4))
  _loop(train.StepProfiler(str(tmp_path / 'other'), 0, 3, enabled=False), range(1, 4))
  assert not os.path.exists(tmp_path / 'off') and not os.path.exists(tmp_path / 'other')


def test_profiler_stops_the_trace_when_the_loop_is_interrupted(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    _loop(train.StepProfiler(str(tmp_path / 'a'), 1, 10), range(1, 20), fail_at=3)
  # The trace is written only when it stops, and a new one can start.
  assert traced_steps(str(tmp_path / 'a')) == [2, 3]
  _loop(train.StepProfiler(str(tmp_path / 'b'), 0, 1), range(1, 3))
  assert traced_steps(str(tmp_path / 'b')) == [1]


@pytest.mark.parametrize('key', ['start_step', 'num_steps'])
def test_negative_profile_settings_are_one_line_errors(key):
  config = tiny_config()
  config.profile[key] = -1
  with pytest.raises(ValueError, match=rf'^--config\.profile\.{key} must be >= 0, got -1\.$'):
    train.validate_config(config)


@pytest.mark.slow
def test_training_under_the_transfer_guard_writes_the_profile_window(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_steps=3)
  config.checkpoint.every_steps = 100  # saves once, at the end
  config.profile.update(start_step=1, num_steps=2)  # step 1 (compilation) not traced
  config.debug.transfer_guard = True
  results = train.train_and_evaluate(config, workdir, progress_bar=False)
  assert results['eval_count'] == 360
  profile_dir = os.path.join(workdir, train.PROFILE_SUBDIR)
  assert glob.glob(os.path.join(profile_dir, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert glob.glob(os.path.join(profile_dir, 'plugins', 'profile', '*', 'perfetto_trace.json.gz'))
  assert traced_steps(profile_dir) == [2, 3]


@pytest.mark.slow
def test_an_implicit_transfer_in_the_loop_is_an_error_under_the_guard(tmp_path, monkeypatch):
  """A host NumPy value passed to a jitted function inside the loop: a silent copy (and
  a host sync) per step without the guard, an error with it."""
  check_finite = train.check_finite

  def check_finite_on_the_device(metrics, *args):
    check_finite(metrics, *args)
    jax.block_until_ready(jnp.isfinite(metrics['loss']))  # `metrics` are NumPy here

  monkeypatch.setattr(train, 'check_finite', check_finite_on_the_device)
  config = tiny_config(num_steps=1)
  config.debug.transfer_guard = True
  with pytest.raises(jax.errors.JaxRuntimeError, match='Disallowed host-to-device transfer'):
    train.train_and_evaluate(config, str(tmp_path / 'guarded'), progress_bar=False)

  config.debug.transfer_guard = False
  results = train.train_and_evaluate(config, str(tmp_path / 'unguarded'), progress_bar=False)
  assert results['eval_count'] == 360
