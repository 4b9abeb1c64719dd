"""`benchmark --compare-timm` without torch or timm: its settings and its missing-peer path."""

import sys
import time

import haiku as hk  # noqa: F401 - the models' import, loaded before the masks are built
import jax.numpy as jnp
import pytest

from nfnet_jax import benchmark, optim, timm_compare
from nfnet_jax import config as config_lib


def test_missing_peer_says_how_to_install(monkeypatch, capsys):
  # A None entry makes `import timm` raise ImportError, as when it is not installed.
  monkeypatch.setitem(sys.modules, 'timm', None)
  monkeypatch.setitem(sys.modules, 'timm.utils', None)
  assert benchmark.main(['--compare-timm']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) >= 1
  message = err[-1]
  assert message.startswith('error: The timm comparison needs PyTorch and timm')
  assert 'pip install torch timm' in message


def test_missing_torch_is_named(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  monkeypatch.setitem(sys.modules, 'timm', None)
  with pytest.raises(timm_compare.PeerMissing, match='pip install torch timm'):
    timm_compare.import_peer()


def test_settings_follow_the_config():
  config = config_lib.imagenet_config('F0')
  config.train.batch_size = 512
  config.optimizer.update(
    base_lr=0.2, clipping=0.02, eps=5e-4, momentum=0.8, nesterov=False, weight_decay=3e-5
  )
  config.label_smoothing = 0.05
  config.model.kwargs.update(drop_rate=0.3, stochdepth_rate=0.15)
  s = timm_compare.peer_settings(config, 1000, 8, 128, 192)
  assert s.model_name == 'dm_nfnet_f0'
  assert (s.num_classes, s.batch_size, s.image_size, s.eval_image_size) == (1000, 8, 128, 192)
  assert (s.drop_rate, s.drop_path_rate, s.label_smoothing) == (0.3, 0.15, 0.05)
  assert (s.clipping, s.agc_eps, s.momentum, s.nesterov) == (0.02, 5e-4, 0.8, False)
  assert s.weight_decay == 3e-5
  assert s.learning_rate == pytest.approx(0.2 * 512 / 256)  # the linear scaling rule
  config.optimizer.scale_by_batch = False
  assert timm_compare.peer_settings(config, 10, 8, 128, 192).learning_rate == 0.2


def test_the_published_f0_recipe():
  # arXiv 2102.06171: AGC 0.01, Nesterov momentum 0.9, weight decay 2e-5, label
  # smoothing 0.1, F0 dropout 0.2.
  s = timm_compare.peer_settings(config_lib.imagenet_config('F0'), 1000, 8, 128, 192)
  assert (s.clipping, s.momentum, s.nesterov, s.weight_decay) == (0.01, 0.9, True, 2e-5)
  assert (s.label_smoothing, s.drop_rate) == (0.1, 0.2)


def test_model_names_and_refusals():
  assert timm_compare.timm_model_name('F3') == 'dm_nfnet_f3'
  for bad in ('F7', 'NF-ResNet50'):
    with pytest.raises(ValueError, match='dm_nfnet_f0..f6'):
      timm_compare.timm_model_name(bad)
  config = config_lib.imagenet_config('F0')
  config.optimizer.name = 'rmsprop'
  with pytest.raises(ValueError, match='sgd_agc'):
    timm_compare.peer_settings(config, 1000, 8, 128, 192)


# Our parameter (module, name) and the same parameter in timm's NormFreeNet.
PAIRS = [
  (('NFNet/~/stem_conv0', 'w'), 'stem.conv1.weight'),
  (('NFNet/~/stem_conv0', 'gain'), 'stem.conv1.gain'),
  (('NFNet/~/stem_conv0', 'bias'), 'stem.conv1.bias'),
  (('NFNet/~/nf_block/~/conv1', 'w'), 'stages.0.0.conv2.weight'),
  (('NFNet/~/nf_block/~/conv1', 'gain'), 'stages.0.0.conv2.gain'),
  (('NFNet/~/nf_block', 'skip_gain'), 'stages.0.0.skipinit_gain'),
  (('NFNet/~/nf_block/~/squeeze_excite/~/linear', 'w'), 'stages.0.0.attn_last.fc1.weight'),
  (('NFNet/~/nf_block/~/squeeze_excite/~/linear', 'b'), 'stages.0.0.attn_last.fc1.bias'),
  (('NFNet/~/linear', 'w'), 'head.fc.weight'),
  (('NFNet/~/linear', 'b'), 'head.fc.bias'),
]


def test_peer_parameter_groups_match_ours():
  params = {}
  for (module, name), _ in PAIRS:
    params.setdefault(module, {})[name] = jnp.zeros(())
  clip, decay = optim.agc_mask(params), optim.weight_decay_mask(params)
  for (module, name), timm_name in PAIRS:
    assert timm_compare.peer_clips(timm_name) == clip[module][name], timm_name
    assert timm_compare.peer_decays(timm_name) == decay[module][name], timm_name
  # The paper leaves only the classifier weight unclipped.
  assert [t for _, t in PAIRS if not timm_compare.peer_clips(t)] == ['head.fc.weight']


def test_interleaved_alternates_and_counts():
  calls = []

  def call(name):
    calls.append(name)
    time.sleep(1e-3)  # a step takes some time; the ratio divides by it

  r = timm_compare.interleaved(lambda: call('o'), lambda: call('p'), 3, 2)
  assert calls == ['o', 'p'] * 5
  assert r['ratio_min'] <= r['ratio_max']
  assert r['ours_ms'] > 0 and r['peer_ms'] > 0
