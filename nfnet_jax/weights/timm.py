"""timm's `dm_nfnet_f0`..`f6` weights (a `.safetensors` state dict) as an NFNet parameter tree.

timm (huggingface/pytorch-image-models, `timm/models/nfnet.py`) ports DeepMind's released
NFNet-F weights to PyTorch as the models `dm_nfnet_f{k}`; the Hugging Face hub publishes them
as `model.safetensors` in the repos `timm/dm_nfnet_f{k}.dm_in1k`. Their keys are the
module's own state-dict names (timm registers no checkpoint filter for NFNets), and their
values are DeepMind's; only names and layouts differ:

  timm key (per block: stages.{s}.{j}.)        Haiku module / parameter
  stem.conv{i+1}.{weight,gain,bias}            stem_conv{i}/{w,gain,bias}
  conv1, conv2, conv2b, conv3                  nf_block_{k}/~/conv0, conv1, conv1b, conv2
  downsample.conv                              nf_block_{k}/~/conv_shortcut
  attn_last.fc1, attn_last.fc2                 nf_block_{k}/~/squeeze_excite/~/linear, linear_1
  skipinit_gain                                nf_block_{k}/skip_gain
  final_conv, head.fc                          final_conv, linear

where k counts blocks over the whole network. Layouts: conv weights OIHW -> HWIO, conv
gains [O, 1, 1, 1] -> [O], the classifier's weight [out, in] -> [in, out], the
squeeze-excite's weights (1x1 convs in timm) [out, in, 1, 1] -> [in, out].

Only parameters are mapped. timm's `dm_nfnet` computes a slightly different function from
them than DeepMind's code (and this package): GELU with the exact erf where DeepMind uses
the tanh approximation, and weight standardisation as (W - mean) / sqrt(var + 1e-5) /
sqrt(fan_in) where DeepMind's is (W - mean) / sqrt(max(var * fan_in, 1e-4)). The converted
weights reproduce DeepMind's logits, not timm's.

The file's header (names, dtypes, shapes) is read and checked against the model before any
array is read; the arrays are then read with `safetensors.numpy` (no PyTorch).
"""

import json
import math
import os
import re
import struct
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np
from safetensors import numpy as safetensors_numpy

from nfnet_jax import fileio, models
from nfnet_jax.weights import check, npz
from nfnet_jax.weights.errors import CorruptCheckpointError, ParamsMismatchError

ParamTree = dict[str, dict[str, np.ndarray]]

FAMILY = models.get_family('NFNet')
# safetensors' own bound on the JSON header (safetensors/src/tensor.rs, MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
_ITEM_SIZES = {
  'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2, 'F16': 2,
  'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8,
}  # fmt: skip
_FLOAT_DTYPES = ('F16', 'F32', 'F64')  # the floating dtypes NumPy holds natively
_SHOWN = 4  # keys named per kind of problem


class Layout(NamedTuple):
  """How one parameter's timm array becomes the Haiku one, and the timm shape of a
  Haiku shape (for the expected file). `to_haiku` returns None for an array of the
  wrong rank or trailing sizes."""

  to_haiku: Callable[[np.ndarray], Optional[np.ndarray]]
  timm_shape: Callable[[tuple], tuple]


def _when(fits: Callable[[tuple], bool], fn: Callable) -> Callable:
  return lambda a: fn(a) if fits(np.shape(a)) else None


SAME = Layout(lambda a: a, tuple)
# nn.Conv2d: [out, in / groups, kh, kw]; Haiku: [kh, kw, in / groups, out].
OIHW = Layout(
  _when(lambda s: len(s) == 4, lambda a: a.transpose(2, 3, 1, 0)),
  lambda s: (s[3], s[2], s[0], s[1]),
)
# ScaledStdConv2d keeps its gain as [out, 1, 1, 1] to broadcast over the weight.
GAIN = Layout(
  _when(lambda s: len(s) == 4 and s[1:] == (1, 1, 1), lambda a: a.reshape(-1)),
  lambda s: (*s, 1, 1, 1),
)
# nn.Linear: [out, in]; hk.Linear: [in, out].
DENSE = Layout(_when(lambda s: len(s) == 2, lambda a: a.T), lambda s: (s[1], s[0]))
# timm's squeeze-excite is two 1x1 nn.Conv2d on the pooled features.
DENSE_1X1 = Layout(
  _when(lambda s: len(s) == 4 and s[2:] == (1, 1), lambda a: a[:, :, 0, 0].T),
  lambda s: (s[1], s[0], 1, 1),
)

# {Haiku parameter: (timm parameter, layout)} of each kind of module.
_CONV = {'w': ('weight', OIHW), 'gain': ('gain', GAIN), 'bias': ('bias', SAME)}
_SE_FC = {'w': ('weight', DENSE_1X1), 'b': ('bias', SAME)}
_HEAD = {'w': ('weight', DENSE), 'b': ('bias', SAME)}
# (Haiku sub-module of a block, timm sub-module of a block, parameters).
_BLOCK_PARTS = (
  ('conv0', 'conv1', _CONV),
  ('conv1', 'conv2', _CONV),
  ('conv1b', 'conv2b', _CONV),
  ('conv2', 'conv3', _CONV),
  ('conv_shortcut', 'downsample.conv', _CONV),
  ('squeeze_excite/~/linear', 'attn_last.fc1', _SE_FC),
  ('squeeze_excite/~/linear_1', 'attn_last.fc2', _SE_FC),
)
_SKIP_GAIN = ('skip_gain', 'skipinit_gain')
_NETWORK_PARTS = (('final_conv', 'final_conv', _CONV), (FAMILY.classifier, 'head.fc', _HEAD))
_STEM = re.compile(r'stem_conv(\d+)$')
_BLOCK = re.compile(re.escape(FAMILY.block) + r'(?:_(\d+))?$')
_STAGE_KEY = re.compile(r'stages\.(\d+)\.(\d+)\.')


class _Slot(NamedTuple):
  """One parameter: where it lives in each naming, its layout and its Haiku shape."""

  module: str
  name: str
  layout: Layout
  shape: tuple


def _block_module(root: str, k: int) -> str:
  return f'{root}/~/{FAMILY.block}' + (f'_{k}' if k else '')


def _timm_module(rest: str, stage_of: Callable[[int], tuple[int, int]]) -> Optional[tuple]:
  """(timm module, {param: (timm param, layout)}) of a Haiku module path below the root,
  the skip gain's module given as ('stages.s.j', None)."""
  for haiku, timm, params in _NETWORK_PARTS:
    if rest == haiku:
      return timm, params
  match = _STEM.match(rest)
  if match:
    return f'stem.conv{int(match.group(1)) + 1}', _CONV
  block, _, part = rest.partition('/~/')
  match = _BLOCK.match(block)
  if not match:
    return None
  s, j = stage_of(int(match.group(1) or 0))
  if not part:
    return f'stages.{s}.{j}', None
  for haiku, timm, params in _BLOCK_PARTS:
    if part == haiku:
      return f'stages.{s}.{j}.{timm}', params
  return None


def _expected(variant: str, num_classes: int, model_kwargs: dict) -> dict[str, _Slot]:
  """{timm key: slot} of every parameter of the model, in natural order of the keys."""
  fam, key = models.resolve(variant)
  root = model_kwargs.get('name', fam.root)
  starts = np.cumsum([0, *fam.variants[key]['depth']])

  def stage_of(k: int) -> tuple[int, int]:
    s = int(np.searchsorted(starts, k, side='right')) - 1
    return s, k - int(starts[s])

  slots = {}
  shapes = check.expected_param_shapes(variant, num_classes, **model_kwargs)
  for module, params in shapes.items():
    found = _timm_module(module.removeprefix(f'{root}/~/'), stage_of)
    if found is None:
      raise AssertionError(f'{module} has no timm counterpart: extend the tables above')
    timm_module, table = found
    for name, shape in params.items():
      timm_name, layout = (_SKIP_GAIN[1], SAME) if table is None else table[name]
      slots[f'{timm_module}.{timm_name}'] = _Slot(module, name, layout, shape)
  return dict(sorted(slots.items(), key=lambda item: check._natural_key(item[0])))


def to_haiku(state: Mapping[str, np.ndarray], root: str = FAMILY.root) -> tuple[ParamTree, list]:
  """Maps a timm `dm_nfnet` state dict onto Haiku names and layouts, block by block
  from the file's own `stages.{s}.{j}` keys; returns (tree, the keys it could not place:
  other names, or arrays of the wrong rank). No shape is checked against a model."""
  depths = {}
  for key in state:
    match = _STAGE_KEY.match(key)
    if match:
      s, j = int(match.group(1)), int(match.group(2))
      depths[s] = max(depths.get(s, 0), j + 1)
  starts = np.cumsum([0] + [depths.get(s, 0) for s in range(max(depths, default=-1) + 1)])
  names = {}  # timm key -> (module, name, layout)
  for k in range(int(starts[-1])):
    s = int(np.searchsorted(starts, k, side='right')) - 1
    prefix, module = f'stages.{s}.{k - int(starts[s])}', _block_module(root, k)
    names[f'{prefix}.{_SKIP_GAIN[1]}'] = (module, _SKIP_GAIN[0], SAME)
    for haiku, timm, params in _BLOCK_PARTS:
      for name, (timm_name, layout) in params.items():
        names[f'{prefix}.{timm}.{timm_name}'] = (f'{module}/~/{haiku}', name, layout)
  stem = [int(m.group(1)) for m in map(re.compile(r'stem\.conv(\d+)\.').match, state) if m]
  for i in range(1, max(stem, default=0) + 1):  # timm counts the stem convs from 1
    for name, (timm_name, layout) in _CONV.items():
      names[f'stem.conv{i}.{timm_name}'] = (f'{root}/~/stem_conv{i - 1}', name, layout)
  for haiku, timm, params in _NETWORK_PARTS:
    for name, (timm_name, layout) in params.items():
      names[f'{timm}.{timm_name}'] = (f'{root}/~/{haiku}', name, layout)

  tree, unplaced = {}, []
  for key, value in state.items():
    module, name, layout = names.get(key, (None, None, None))
    converted = None if layout is None else layout.to_haiku(value)
    if converted is None:
      unplaced.append(key)
    else:
      tree.setdefault(module, {})[name] = converted
  return tree, unplaced


# ---------------------------------------------------------------------------
# The file.


class TensorInfo(NamedTuple):
  dtype: str
  shape: tuple


def _not_safetensors(path: str, why: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(
    f"{path} is not a safetensors file ({why}): pass the `model.safetensors` of timm's "
    'dm_nfnet_f* (e.g. the hub repo timm/dm_nfnet_f0.dm_in1k)'
  )


def read_header(path) -> dict[str, TensorInfo]:
  """{key: (safetensors dtype, shape)} from a .safetensors file's header, checked for
  consistency (every tensor's byte range inside the file, of its shape's size); no
  tensor data is read. Raises CorruptCheckpointError (one line) for anything else."""
  path = os.fspath(path)
  if fileio.is_remote(path):
    raise CorruptCheckpointError(
      f'{path}: timm safetensors files are read from local disk: copy it here first'
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file (the timm .safetensors to convert)')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):
      raise _not_safetensors(
        path, 'a zip or a pickle: a PyTorch .pth/.bin, or an .npz (convert without --from-timm)'
      )
    if len(head) < 8:
      raise _not_safetensors(path, f'{size} bytes, shorter than the header length field')
    (length,) = struct.unpack('<Q', head)
    if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
      raise _not_safetensors(
        path, f'its header length field says {length:,} bytes, the file holds {size:,}'
      )
    text = f.read(length)
  try:
    header = json.loads(text.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _not_safetensors(path, f'its header is not JSON: {e}') from None
  if not isinstance(header, dict):
    raise _not_safetensors(path, 'its header is not a JSON object')
  data_bytes = size - 8 - length
  tensors = {}
  for key, entry in header.items():
    if key == '__metadata__':
      continue
    try:
      dtype, shape, (begin, end) = entry['dtype'], entry['shape'], entry['data_offsets']
      shape = tuple(int(d) for d in shape)
      ok = (
        dtype in _ITEM_SIZES
        and all(d >= 0 for d in shape)
        and 0 <= begin <= end <= data_bytes
        and end - begin == math.prod(shape) * _ITEM_SIZES[dtype]
      )
    except (TypeError, KeyError, ValueError):
      ok = False
    if not ok:
      raise CorruptCheckpointError(
        f'{path}: damaged safetensors file: the header entry of {key!r} ({entry!r:.120}) '
        f"is not a tensor inside the file's {data_bytes:,} data bytes"
      )
    tensors[key] = TensorInfo(dtype, shape)
  return tensors


def _other_model(keys) -> Optional[str]:
  """Why a state dict is not timm's dm_nfnet (another timm model, or no timm NFNet at
  all), or None."""
  keys = sorted(keys)
  if any(k.startswith('stem.conv.') for k in keys):
    return "a single stem conv: timm's nf_resnet* / nf_regnet*"
  if not any(k.startswith('stem.conv1.') for k in keys) or not any(
    _STAGE_KEY.match(k) for k in keys
  ):
    shown = ', '.join(keys[:3]) + (', ...' if len(keys) > 3 else '')
    return f'no stem.conv1 / stages.* keys (found {shown or "no tensors"})'
  if any('.attn_last.conv.' in k for k in keys):
    return "ECA attention: timm's eca_nfnet_l*"
  if not any(k.endswith('.' + _SKIP_GAIN[1]) for k in keys):
    return "no skipinit_gain: timm's own nfnet_f* / nfnet_l* (not DeepMind's weights)"
  return None


def _listed(keys: list) -> str:
  return ', '.join(keys[:_SHOWN]) + (', ...' if len(keys) > _SHOWN else '')


def _timm_name(variant: str) -> str:
  """How timm names a variant it ports (dm_nfnet_f0..f6); other variants by our name."""
  return f"timm's dm_nfnet_{variant.lower()}" if re.fullmatch(r'F[0-6]', variant) else variant


def _resolve_variant(path: str, header: Mapping, variant: Optional[str], width) -> str:
  """The variant to convert for: the asked one, or the one the file's shapes match;
  refuses a file whose shapes match another variant, naming it."""
  placeholders = {k: np.broadcast_to(np.float32(0), t.shape) for k, t in header.items()}
  guess = check.guess_variant(to_haiku(placeholders)[0], width)
  if variant is None:
    if guess is None:
      raise ParamsMismatchError(
        f'cannot tell which NFNet variant {path} holds: pass --variant (F0..F6 for '
        "timm's dm_nfnet_f0..f6)"
      )
    return guess
  variant = models.canonical_name(variant)
  if models.family_of_variant(variant) != FAMILY.name:
    raise ParamsMismatchError(
      f"--from-timm maps timm's dm_nfnet_f* onto NFNet, but {variant!r} is a "
      f'{models.resolve(variant)[0].title} variant: pass an NFNet variant (F0..F6)'
    )
  if guess is not None and guess != variant:
    depths = models.variant_params(guess)['depth']
    raise ParamsMismatchError(
      f'{path} holds {_timm_name(guess)} (NFNet {guess}: stage depths {list(depths)}), not '
      f'{variant}: pass --variant {guess}'
    )
  return variant


def _check_header(
  path: str, header: Mapping, slots: Mapping, variant: str, num_classes: int, kw: dict
) -> None:
  """Every expected key present with its shape and a float dtype, none extra; one line."""
  missing = [k for k in slots if k not in header]
  unexpected = sorted((k for k in header if k not in slots), key=check._natural_key)
  mismatched, wrong_dtype = [], []
  for key, slot in slots.items():
    if key not in header:
      continue
    want, got = slot.layout.timm_shape(slot.shape), header[key].shape
    if got != want:
      mismatched.append(f'{key} {list(got)} (expected {list(want)})')
    elif header[key].dtype not in _FLOAT_DTYPES:
      wrong_dtype.append(f'{key} {header[key].dtype}')
  problems = [
    f'{len(items)} {label}: {_listed(items)}'
    for label, items in (
      ('missing key(s)', missing),
      ('unexpected key(s)', unexpected),
      ('shape mismatch(es)', mismatched),
      ('non-float32/16/64 tensor(s)', wrong_dtype),
    )
    if items
  ]
  if not problems:
    return
  hints = []
  head = header.get('head.fc.weight')
  if head is not None and len(head.shape) == 2 and head.shape[0] != num_classes:
    hints.append(f'the classifier has {head.shape[0]} outputs: pass --num-classes {head.shape[0]}')
  if wrong_dtype:
    hints.append('re-save the file in float32 (NumPy reads no bfloat16)')
  if not hints:
    hints.append('check --variant, --width and --group-size')
  kw_text = ''.join(f', {k}={v!r}' for k, v in sorted(kw.items()))
  raise ParamsMismatchError(
    f'{path} does not match NFNet {variant} (num_classes={num_classes}{kw_text}) in '
    f"timm's layout: {'; '.join(problems)}. Likely fix: {'; '.join(hints)}"
  )


def load_timm(
  path, variant: Optional[str] = None, num_classes: int = 1000, **model_kwargs
) -> tuple[ParamTree, str]:
  """Reads timm's `dm_nfnet_f*` weights from a `.safetensors` file as a Haiku parameter
  tree for `NFNet(num_classes, variant, **model_kwargs)`; returns (params, the variant's
  canonical name).

  `variant` defaults to the one the file's shapes match. Every key, shape and dtype is
  checked (from the file's header, before any tensor is read) against the model;
  errors name the offending timm keys in one line.
  """
  path = os.fspath(path)
  header = read_header(path)
  reason = _other_model(header)
  if reason:
    raise ParamsMismatchError(
      f"{path} is not timm's dm_nfnet_f0..f6 ({reason}); only those hold DeepMind's NFNet "
      'weights in the layout --from-timm maps'
    )
  variant = _resolve_variant(path, header, variant, model_kwargs.get('width'))
  slots = _expected(variant, num_classes, model_kwargs)
  _check_header(path, header, slots, variant, num_classes, model_kwargs)
  try:
    state = safetensors_numpy.load_file(path)
  except Exception as e:  # safetensors raises its own SafetensorError, and others
    raise CorruptCheckpointError(f'{path}: damaged safetensors file: {e}') from None
  params = {}
  for key, slot in slots.items():
    value = slot.layout.to_haiku(state.pop(key))  # pop: frees each timm array once mapped
    params.setdefault(slot.module, {})[slot.name] = np.asarray(value, np.float32, order='C')
  check.check_params(params, variant, num_classes, **model_kwargs)  # a guard: cannot fail
  return params, variant


def convert_timm(
  src,
  dst,
  variant: Optional[str] = None,
  *,
  overwrite: bool = False,
  num_classes: int = 1000,
  **model_kwargs,
) -> dict:
  """`load_timm(src)`, written as the package's pickle-free `.npz` to `dst`. Returns the
  summary `weights.convert` returns (variant, family, key, dst, arrays, values, md5)."""
  params, variant = load_timm(src, variant, num_classes, **model_kwargs)
  dst = npz.save_converted(params, dst, variant, overwrite=overwrite)
  fam, key = models.resolve(variant)
  return dict(
    variant=variant,
    family=fam.name,
    key=key,
    dst=dst,
    arrays=sum(len(g) for g in params.values()),
    values=int(sum(v.size for g in params.values() for v in g.values())),
    md5=check._md5(dst),  # pylint: disable=protected-access
  )
