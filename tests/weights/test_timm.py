"""timm's dm_nfnet_f* safetensors -> the NFNet tree: names, layouts, checks, the CLI.

The files are written here as timm's `NormFreeNet.state_dict()` would be saved (module
names of timm/models/nfnet.py, PyTorch layouts: nn.Conv2d weights [out, in/groups, kh,
kw], ScaledStdConv2d gains [out, 1, 1, 1], nn.Linear weights [out, in], the
squeeze-excite's fc1/fc2 as 1x1 convs, skipinit_gain a 0-d tensor), with NumPy and
safetensors only: no torch.
"""

import io
import json
import re
import struct
import subprocess
import sys
import zipfile

import haiku as hk
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from nfnet_jax import convert as convert_cli
from nfnet_jax import models, weights
from nfnet_jax.models import layers
from nfnet_jax.weights import timm
from tests.weights.helpers import NARROW, NUM_CLASSES, assert_trees_equal, model_tree
from tests.weights.test_convert_cli import REPO, WROTE

DEPTHS = {'F0': [1, 2, 6, 3], 'F1': [2, 4, 12, 6]}  # paper table 1


def timm_state(tree, depths):
  """What timm's dm_nfnet state_dict() holds for the DeepMind-layout `tree`, walked in
  timm's module order: stem.conv1..4, stages.{s}.{j} (downsample, conv1, conv2, conv2b,
  conv3, attn_last, skipinit_gain), final_conv, head.fc."""

  def ours(module):
    return tree[f'NFNet/~/{module}']

  state = {}

  def scaled_std_conv(prefix, p):
    state[f'{prefix}.weight'] = np.transpose(p['w'], (3, 2, 0, 1))  # HWIO -> OIHW
    state[f'{prefix}.gain'] = p['gain'].reshape(-1, 1, 1, 1)
    state[f'{prefix}.bias'] = p['bias']

  for i in range(4):
    scaled_std_conv(f'stem.conv{i + 1}', ours(f'stem_conv{i}'))
  block = 0
  for s, depth in enumerate(depths):
    for j in range(depth):
      name = 'nf_block' if block == 0 else f'nf_block_{block}'
      prefix = f'stages.{s}.{j}'
      if f'NFNet/~/{name}/~/conv_shortcut' in tree:
        scaled_std_conv(f'{prefix}.downsample.conv', ours(f'{name}/~/conv_shortcut'))
      for timm_conv, haiku_conv in zip(('conv1', 'conv2', 'conv2b', 'conv3'), range(4)):
        haiku_name = ['conv0', 'conv1', 'conv1b', 'conv2'][haiku_conv]
        scaled_std_conv(f'{prefix}.{timm_conv}', ours(f'{name}/~/{haiku_name}'))
      for fc, linear in (('fc1', 'linear'), ('fc2', 'linear_1')):
        p = ours(f'{name}/~/squeeze_excite/~/{linear}')
        state[f'{prefix}.attn_last.{fc}.weight'] = p['w'].T[:, :, None, None]
        state[f'{prefix}.attn_last.{fc}.bias'] = p['b']
      state[f'{prefix}.skipinit_gain'] = np.asarray(ours(name)['skip_gain']).reshape(())
      block += 1
  scaled_std_conv('final_conv', ours('final_conv'))
  state['head.fc.weight'] = ours('linear')['w'].T
  state['head.fc.bias'] = ours('linear')['b']
  return {k: np.array(v, order='C') for k, v in state.items()}  # 0-d stays 0-d


def write_timm(path, state):
  safetensors_numpy.save_file(state, str(path), metadata={'format': 'pt'})
  return path


@pytest.fixture(scope='module')
def f0_tree():
  return model_tree('F0', seed=3)


@pytest.fixture
def f0_file(tmp_path, f0_tree):
  return write_timm(tmp_path / 'model.safetensors', timm_state(f0_tree, DEPTHS['F0']))


def test_the_writer_encodes_timms_f0_shapes():
  """At full width the test's writer gives the shapes timm's dm_nfnet_f0 has (its
  module definitions: stem chs 16/32/64/128, mid = out/2 in groups of 128, SE with
  rd_ratio 0.5, final conv 2 x 1536, stage 0's downsample a 128 -> 256 1x1 conv)."""
  shapes = weights.expected_param_shapes('F0', 1000)
  tree = {
    m: {n: np.broadcast_to(np.float32(0), s) for n, s in p.items()} for m, p in shapes.items()
  }
  state = timm_state(tree, DEPTHS['F0'])
  assert state['stem.conv1.weight'].shape == (16, 3, 3, 3)
  assert state['stem.conv1.gain'].shape == (16, 1, 1, 1)
  assert state['stem.conv4.weight'].shape == (128, 64, 3, 3)
  assert state['stages.0.0.downsample.conv.weight'].shape == (256, 128, 1, 1)
  assert state['stages.0.0.conv2.weight'].shape == (128, 128, 3, 3)  # 1 group of 128
  assert state['stages.2.0.conv2b.weight'].shape == (768, 128, 3, 3)  # 6 groups
  assert state['stages.2.5.attn_last.fc1.weight'].shape == (768, 1536, 1, 1)
  assert state['stages.3.2.skipinit_gain'].shape == ()
  assert state['final_conv.weight'].shape == (3072, 1536, 1, 1)
  assert state['head.fc.weight'].shape == (1000, 3072)
  assert 'stages.2.1.downsample.conv.weight' not in state
  assert len(state) == 4 * 3 + 12 * (4 * 3 + 4 + 1) + 4 * 3 + 3 + 2


@jax.jit
def _logits(params, images):
  def forward(x):
    return models.NFNet(NUM_CLASSES, variant='F0', **NARROW)(x, is_training=False)['logits']

  with layers.conv_impl('native'):  # the smaller program: compiles faster on CPU
    return hk.without_apply_rng(hk.transform(forward)).apply(params, images)


def test_converts_to_the_same_tree_and_logits(f0_file, f0_tree):
  params, variant = weights.load_timm(f0_file, 'F0', NUM_CLASSES, **NARROW)
  assert variant == 'F0'
  assert_trees_equal(f0_tree, params)
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  logits = np.asarray(_logits(params, images))
  assert logits.shape == (2, NUM_CLASSES) and np.all(np.isfinite(logits))
  np.testing.assert_array_equal(logits, np.asarray(_logits(f0_tree, images)))
  # The variant is read off the file when not given.
  assert weights.load_timm(f0_file, None, NUM_CLASSES, **NARROW)[1] == 'F0'


def _torch_conv2d(x, w, groups):
  """F.conv2d(x, w, groups=groups), VALID, stride 1, in NCHW / OIHW, by hand."""
  o, i_per_group, kh, kw = w.shape
  n, _, h, wd = x.shape
  out = np.zeros((n, o, h - kh + 1, wd - kw + 1), np.float64)
  per_out = o // groups
  for oc in range(o):
    g = oc // per_out
    xs = x[:, g * i_per_group : (g + 1) * i_per_group]
    for dy in range(kh):
      for dx in range(kw):
        out[:, oc] += np.einsum(
          'nchw,c->nhw', xs[:, :, dy : dy + out.shape[2], dx : dx + out.shape[3]], w[oc, :, dy, dx]
        )
  return out


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  groups=st.integers(1, 3),
  per_group_in=st.integers(1, 3),
  per_group_out=st.integers(1, 3),
  kh=st.integers(1, 3),
  kw=st.integers(1, 3),
  seed=st.integers(0, 2**16),
)
def test_conv_layout_means_the_same_convolution(groups, per_group_in, per_group_out, kh, kw, seed):
  """A timm (PyTorch) grouped conv weight, converted, convolves as PyTorch would: the
  Haiku layout's lax convolution equals a by-hand NCHW/OIHW convolution."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((groups * per_group_out, per_group_in, kh, kw)).astype(np.float32)
  x = rng.standard_normal((2, groups * per_group_in, 5, 6)).astype(np.float32)
  tree, unplaced = timm.to_haiku({'stages.0.0.conv2.weight': w})
  assert unplaced == []
  hwio = tree['NFNet/~/nf_block/~/conv1']['w']
  ours = jax.lax.conv_general_dilated(
    jnp.asarray(x.transpose(0, 2, 3, 1)),
    jnp.asarray(hwio),
    (1, 1),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
    precision='highest',
  )
  np.testing.assert_allclose(
    np.asarray(ours).transpose(0, 3, 1, 2), _torch_conv2d(x, w, groups), rtol=1e-5, atol=1e-5
  )


def test_linear_and_gain_layouts():
  """nn.Linear computes x @ W.T + b; a 1x1 nn.Conv2d on pooled features the same; the
  conv gain [O, 1, 1, 1] scales output channel o by gain[o]."""
  rng = np.random.default_rng(1)
  fc = rng.standard_normal((5, 7)).astype(np.float32)
  se = rng.standard_normal((3, 7, 1, 1)).astype(np.float32)
  gain = rng.standard_normal((4, 1, 1, 1)).astype(np.float32)
  tree, _ = timm.to_haiku(
    {'head.fc.weight': fc, 'stages.0.0.attn_last.fc1.weight': se, 'final_conv.gain': gain}
  )
  x = rng.standard_normal((2, 7)).astype(np.float32)
  np.testing.assert_allclose(x @ tree['NFNet/~/linear']['w'], x @ fc.T, rtol=1e-6)
  se_w = tree['NFNet/~/nf_block/~/squeeze_excite/~/linear']['w']
  np.testing.assert_allclose(x @ se_w, np.einsum('oi,ni->no', se[:, :, 0, 0], x), rtol=1e-6)
  np.testing.assert_array_equal(tree['NFNet/~/final_conv']['gain'], gain[:, 0, 0, 0])


def _error(path, *args, **kwargs) -> str:
  with pytest.raises((ValueError, OSError)) as info:
    weights.load_timm(path, *args, **kwargs)
  message = str(info.value)
  assert '\n' not in message, message
  return message


def test_wrong_variant_is_named(tmp_path):
  f1 = write_timm(tmp_path / 'f1.safetensors', timm_state(model_tree('F1', seed=1), DEPTHS['F1']))
  message = _error(f1, 'F0', NUM_CLASSES, **NARROW)
  assert "holds timm's dm_nfnet_f1" in message and '--variant F1' in message
  assert '[2, 4, 12, 6]' in message
  assert weights.load_timm(f1, None, NUM_CLASSES, **NARROW)[1] == 'F1'
  assert 'NF-RegNet' in _error(f1, 'B0', NUM_CLASSES)


def test_shape_mismatches_name_the_keys(tmp_path, f0_tree):
  a = write_timm(tmp_path / 'a.safetensors', timm_state(f0_tree, DEPTHS['F0']))
  message = _error(a, 'F0', **NARROW)
  assert '2 shape mismatch(es): head.fc.bias [10] (expected [1000]), ' in message
  assert 'head.fc.weight [10, 192] (expected [1000, 192])' in message
  assert '--num-classes 10' in message
  state = timm_state(f0_tree, DEPTHS['F0'])
  # HWIO where timm has OIHW; a gain flattened to [O].
  state['stages.2.3.conv1.weight'] = np.ascontiguousarray(
    state['stages.2.3.conv1.weight'].transpose(2, 3, 1, 0)
  )
  state['stem.conv2.gain'] = state['stem.conv2.gain'].reshape(-1)
  message = _error(write_timm(tmp_path / 'b.safetensors', state), 'F0', NUM_CLASSES, **NARROW)
  assert '2 shape mismatch(es)' in message
  assert 'stages.2.3.conv1.weight [1, 1, 96, 48] (expected [48, 96, 1, 1])' in message
  assert 'stem.conv2.gain [32] (expected [32, 1, 1, 1])' in message
  # The width it was made with is part of the model.
  assert 'shape mismatch' in _error(a, 'F0', NUM_CLASSES)


def test_missing_and_unexpected_keys(tmp_path, f0_tree):
  state = timm_state(f0_tree, DEPTHS['F0'])
  del state['stages.2.4.conv2b.weight'], state['stages.3.1.skipinit_gain']
  state['stages.0.0.attn.fc1.weight'] = np.zeros((2, 2, 1, 1), np.float32)
  message = _error(write_timm(tmp_path / 'm.safetensors', state), 'F0', NUM_CLASSES, **NARROW)
  assert (
    '2 missing key(s): stages.2.4.conv2b.weight, stages.3.1.skipinit_gain; '
    '1 unexpected key(s): stages.0.0.attn.fc1.weight'
  ) in message


def test_float16_loads_and_integer_tensors_are_refused(tmp_path, f0_tree):
  state = timm_state(f0_tree, DEPTHS['F0'])
  half = {k: v.astype(np.float16) for k, v in state.items()}
  params, _ = weights.load_timm(
    write_timm(tmp_path / 'h.safetensors', half), 'F0', NUM_CLASSES, **NARROW
  )
  expected = {
    m: {n: v.astype(np.float16).astype(np.float32) for n, v in p.items()}
    for m, p in f0_tree.items()
  }
  assert_trees_equal(expected, params)
  state['final_conv.bias'] = state['final_conv.bias'].astype(np.int32)
  message = _error(write_timm(tmp_path / 'i.safetensors', state), 'F0', NUM_CLASSES, **NARROW)
  assert 'final_conv.bias I32' in message


def _safetensors_bytes(header: dict, data: bytes = b'') -> bytes:
  text = json.dumps(header).encode()
  return struct.pack('<Q', len(text)) + text + data


def _zip_bytes() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('archive/data.pkl', b'\x80\x02}q\x00.')
  return buf.getvalue()


@pytest.mark.parametrize(
  'content, words',
  [
    (b'', 'shorter than the header length field'),
    (b'\x80\x02}q\x00.', 'a PyTorch .pth/.bin'),
    (_zip_bytes(), 'a PyTorch .pth/.bin'),
    (struct.pack('<Q', 1 << 40) + b'{}', 'header length field says'),
    (struct.pack('<Q', 4) + b'{"a"', 'header is not JSON'),
    (_safetensors_bytes([1, 2]), 'not a JSON object'),
    (
      _safetensors_bytes({'x': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}}, bytes(8)),
      "damaged safetensors file: the header entry of 'x'",
    ),
    (
      _safetensors_bytes({'x': {'dtype': 'Q7', 'shape': [1], 'data_offsets': [0, 4]}}, bytes(4)),
      "the header entry of 'x'",
    ),
  ],
)
def test_files_that_are_not_safetensors(tmp_path, content, words):
  path = tmp_path / 'x.safetensors'
  path.write_bytes(content)
  message = _error(path, 'F0')
  assert words in message


def test_damaged_data_and_missing_file(tmp_path, f0_file):
  """A header that passes, over data safetensors refuses (a gap between tensors)."""
  data = f0_file.read_bytes()
  (length,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8 : 8 + length])
  for entry in header.values():
    if 'data_offsets' in entry:
      entry['data_offsets'] = [o + 4 for o in entry['data_offsets']]
  damaged = tmp_path / 'gap.safetensors'
  damaged.write_bytes(_safetensors_bytes(header, data[8 + length :] + bytes(4)))
  assert 'damaged safetensors file' in _error(damaged, 'F0', NUM_CLASSES, **NARROW)
  assert 'no such file' in _error(tmp_path / 'absent.safetensors', 'F0')


@pytest.mark.parametrize(
  'keys, words',
  [
    (['stem.conv.weight', 'stages.0.0.conv1.weight', 'stages.0.0.attn.fc1.weight'], 'nf_resnet'),
    (['stem.conv1.weight', 'stages.0.0.conv1.weight', 'stages.0.0.attn_last.conv.weight'], 'eca'),
    (['stem.conv1.weight', 'stages.0.0.conv1.weight', 'final_conv.weight'], 'no skipinit_gain'),
    (
      ['cls_token', 'blocks.0.attn.qkv.weight', 'head.weight'],
      'found blocks.0.attn.qkv.weight, cls_token',
    ),
  ],
)
def test_other_timm_models_are_refused(tmp_path, keys, words):
  state = {k: np.zeros((2, 2, 1, 1), np.float32) for k in keys}
  message = _error(write_timm(tmp_path / 'other.safetensors', state), 'F0')
  assert "is not timm's dm_nfnet_f0..f6" in message and words in message


def test_cli(tmp_path, f0_file, f0_tree, capsys):
  model = ['--num-classes', str(NUM_CLASSES), '--width', '0.0625', '--group-size', '8']
  dst = tmp_path / 'out.npz'
  assert (
    convert_cli.main(['--from-timm', str(f0_file), '--variant', 'F0', '--out', str(dst), *model])
    == 0
  )
  match = WROTE.match(capsys.readouterr().out.strip())
  assert match and match['dst'] == str(dst) and match['md5'] == weights.file_md5(dst)
  assert_trees_equal(f0_tree, weights.load_pretrained(dst, 'F0', NUM_CLASSES, **NARROW))
  # DST as a positional argument; by default beside the input.
  assert convert_cli.main(['--from-timm', str(f0_file), *model, str(tmp_path / 'p.npz')]) == 0
  assert convert_cli.main(['--from-timm', str(f0_file), *model]) == 0
  assert (tmp_path / 'model.npz').exists()
  capsys.readouterr()
  # One line for each error, and nothing written.
  src, out = ['--from-timm', str(f0_file)], ['--out', str(tmp_path / 'e.npz')]
  for args, words in [
    ([*src, *out, '--variant', 'F0'], 'does not match NFNet F0'),
    ([*src, *out, '--variant', 'F1', *model], "holds timm's dm_nfnet_f0"),
    ([*src, *out, *model, str(tmp_path / 'q.npz')], 'expected SRC and DST'),
  ]:
    assert convert_cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and words in err, err
  assert not (tmp_path / 'e.npz').exists()
  assert convert_cli.main(['--from-timm', str(f0_file), *model, '--out', str(dst)]) == 1
  assert 'already exists' in capsys.readouterr().err


def test_the_real_command_line(tmp_path, f0_file):
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'not a safetensors file at all')
  run = subprocess.run(
    [sys.executable, '-m', 'nfnet_jax.convert', '--from-timm', str(bad), '--variant', 'F0'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert run.returncode == 1 and 'Traceback' not in run.stderr
  errors = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and re.search(r'is not a safetensors file', errors[0]), run.stderr
