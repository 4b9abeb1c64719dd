"""Weights against a model: shape checks with hints, variant guessing, loading, converting.

Any family of the registry (`nfnet_jax.models`): the variant name says which (`F0`,
`NF-ResNet50` or `ResNet50`, `NF-RegNet-B0` or `B0`); a parameter tree says which by its
root module (`NFNet`, `NF_ResNet`, `NF_RegNet`, the names of DeepMind's released code).
`load_pretrained` reads DeepMind's released pickles (`released.py`, nothing in them is
run) and the package's own `.npz` files (`npz.py`), and checks every module path,
parameter name and shape against the model before the arrays are built: a `.npz`'s from
its entries' headers, before any data is inflated; a pickle's from the unpickled
placeholders. A file whose headers declare other (or more, or huge) arrays is refused
without costing their memory.
"""

import functools
import hashlib
import os
import re
from typing import Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax import fileio, models
from nfnet_jax.weights import npz, released
from nfnet_jax.weights.errors import CorruptCheckpointError, ParamsMismatchError

ParamTree = dict[str, dict[str, np.ndarray]]


def family_of(variant: str) -> str:
  """'NFNet', 'NFResNet' or 'NFRegNet' (an unknown variant lists every family's)."""
  return models.family_of_variant(variant)


def classifier_module(variant: str, **model_kwargs) -> str:
  """The classifier's module path: 'NFNet/~/linear', 'NF_ResNet/~/linear', ...

  `name=` in `model_kwargs` (a renamed root module) is taken into account."""
  return models.resolve(variant)[0].classifier_module(model_kwargs.get('name'))


def _shapes_of(fam: models.Family, key: str, num_classes: int, kwargs: dict) -> dict:
  def forward(x):
    return fam.model(num_classes, variant=key, **kwargs)(x, False)

  try:
    # With state: the batch-normalised baselines keep their moving statistics there.
    shapes, _ = jax.eval_shape(
      hk.transform_with_state(forward).init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
  except TypeError as e:  # an argument another family takes (group_size for NF-ResNet)
    raise ParamsMismatchError(f'{fam.title} {key}: {e}') from None
  return {m: {n: tuple(s.shape) for n, s in p.items()} for m, p in shapes.items()}


@functools.lru_cache(maxsize=32)
def _cached_shapes(family_name: str, key: str, num_classes: int, kwargs: tuple) -> dict:
  return _shapes_of(models.get_family(family_name), key, num_classes, dict(kwargs))


def expected_param_shapes(
  variant: str = 'F0', num_classes: int = 1000, **model_kwargs
) -> dict[str, dict[str, tuple]]:
  """{module path: {param name: shape}} of the model `variant` names, built as
  `Family(num_classes, variant=key, **model_kwargs)` (from `jax.eval_shape`: nothing is
  allocated or compiled)."""
  fam, key = models.resolve(variant)
  items = tuple(sorted(model_kwargs.items()))
  try:
    shapes = _cached_shapes(fam.name, key, num_classes, items)
  except TypeError:  # an unhashable argument: no caching
    shapes = _shapes_of(fam, key, num_classes, dict(model_kwargs))
  return {m: dict(p) for m, p in shapes.items()}


def _family_of_root(root: str) -> Optional[models.Family]:
  """`models.family_of_root`, the batch-normalised baselines included."""
  baselines = (fam for fam in models.BASELINES.values() if fam.root == root)
  return models.family_of_root(root) or next(baselines, None)


def _family_of_params(params: Mapping) -> Optional[models.Family]:
  """The family whose root module the tree's modules live under, or None."""
  roots = {m.split('/~/')[0] for m in params}
  return next((fam for fam in map(_family_of_root, sorted(roots)) if fam), None)


def block_layout(params: Mapping, fam: models.Family) -> Optional[tuple[list[int], list[int]]]:
  """(stage depths, stage widths) read off a parameter tree, or None."""
  pattern = re.compile(r'^(?P<prefix>.+)/~/' + re.escape(fam.block) + r'(?:_(?P<index>\d+))?$')
  blocks = {}
  for module in params:
    match = pattern.match(module)
    if match:
      blocks[int(match.group('index') or 0)] = module
  if not blocks or sorted(blocks) != list(range(len(blocks))):
    return None
  starts, widths = [], []
  for i in range(len(blocks)):
    module = blocks[i]
    if i == 0 or f'{module}/~/conv_shortcut' in params:  # a stage's first block
      conv2 = params.get(f'{module}/~/conv2', {}).get('w')
      if conv2 is None or np.ndim(conv2) != 4:
        return None
      starts.append(i)
      widths.append(int(np.shape(conv2)[-1]))
  depths = [b - a for a, b in zip(starts, starts[1:] + [len(blocks)])]
  return depths, widths


def guess_variant(params: Mapping, width: Optional[float] = None) -> Optional[str]:
  """The canonical name of the variant whose stage depths and widths the parameter
  tree has ('F1', 'NF-RegNet-B2', ...), or None.

  The family comes from the root module (`NFNet`, `NF_ResNet`, `NF_RegNet`); stage
  boundaries are the blocks (the family's block module) with a `conv_shortcut`; a
  stage's width is its first block's `conv2` output channels. `width` is the multiplier
  the file was made with (default: the family's, `Family.defaults['width']`, 1 for a
  family without a width argument such as EfficientNet); a tree of the right depths and
  another multiplier (the same proportions) matches too. A family whose blocks have no
  `conv2` (EfficientNet's MBConv) is not guessed: its files name their variant.
  """
  fam = _family_of_params(params)
  layout = fam and block_layout(params, fam)
  if not layout:
    return None
  depths, widths = layout
  width = fam.defaults.get('width', 1.0) if width is None else width
  for key, row in fam.variants.items():
    if list(row['depth']) == depths and [int(w * width) for w in row['width']] == widths:
      return fam.canonical_name(key)
  for key, row in fam.variants.items():  # right depths, another width multiplier
    if list(row['depth']) == depths and len(widths) == len(row['width']):
      ratios = [w / c for w, c in zip(widths, row['width'])]
      if max(ratios) <= 1.05 * min(ratios):
        return fam.canonical_name(key)
  return None


def _natural_key(path: str) -> list:
  """Sorts 'nf_block_2' before 'nf_block_10'."""
  return [(0, int(t), '') if t.isdigit() else (1, 0, t) for t in re.split(r'(\d+)', path)]


def _problems(params: Mapping, expected: Mapping) -> tuple[list[str], bool, bool]:
  """(the mismatches, some conv weight looks OIHW, modules both missing and extra)."""
  problems = []
  missing_modules = sorted((m for m in expected if m not in params), key=_natural_key)
  extra_modules = sorted((m for m in params if m not in expected), key=_natural_key)
  transposed = False
  for module in sorted(expected, key=_natural_key):
    if module not in params:
      continue
    shapes, found = expected[module], params[module]
    for name, shape in shapes.items():
      where = f'{module}/{name}'
      if name not in found:
        problems.append(f'missing parameter {where} (expected shape {fileio.fmt_shape(shape)})')
        continue
      value = found[name]
      got = tuple(np.shape(value))
      if got != shape:
        problems.append(
          f'{where}: expected shape {fileio.fmt_shape(shape)}, found {fileio.fmt_shape(got)}'
        )
        if len(shape) == 4 and got == (shape[3], shape[2], shape[0], shape[1]):
          transposed = True
      elif not np.issubdtype(np.asarray(value).dtype, np.floating):
        problems.append(
          f'{where}: expected a floating-point array, found dtype {np.asarray(value).dtype}'
        )
    for name in found:
      if name not in shapes:
        problems.append(
          f'unexpected parameter {module}/{name} (shape {fileio.fmt_shape(np.shape(found[name]))})'
        )
  for label, modules in (('unexpected', extra_modules), ('missing', missing_modules)):
    if modules:
      listed = ', '.join(modules[:6]) + (', ...' if len(modules) > 6 else '')
      problems.insert(0, f'{len(modules)} {label} module(s): {listed}')
  return problems, transposed, bool(extra_modules and missing_modules)


def check_params(
  params: Mapping, variant: str = 'F0', num_classes: int = 1000, **model_kwargs
) -> None:
  """Checks a parameter tree against `Family(num_classes, variant, **model_kwargs)`,
  the family (NFNet, NFResNet, NFRegNet) being the one `variant` belongs to.

  Every module path and parameter name must be present, none extra, every shape equal
  and every dtype floating. Raises ParamsMismatchError naming each offending parameter
  path with the expected and the found shape, and suggesting the likely fix (the
  variant or num_classes the file's shapes match, an OIHW layout, a renamed root).
  """
  if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
    raise ParamsMismatchError(
      'expected a Haiku parameter dict {module path: {param name: array}}, got '
      f'{type(params).__name__}'
    )
  expected = expected_param_shapes(variant, num_classes, **model_kwargs)
  problems, transposed, misplaced = _problems(params, expected)
  if not problems:
    return

  fam, key = models.resolve(variant)
  hints = []
  guess = guess_variant(params, model_kwargs.get('width'))
  if guess is not None and guess != fam.canonical_name(key):
    depths, widths = block_layout(params, models.resolve(guess)[0])
    hints.append(
      f"the file's shapes match variant {guess!r} (stage depths {depths}, "
      f'stage widths {widths}): pass variant={guess!r}'
    )
  root = model_kwargs.get('name', fam.root)
  linear = params.get(fam.classifier_module(root), {}).get('w')
  if linear is not None and np.ndim(linear) == 2 and np.shape(linear)[1] != num_classes:
    hints.append(
      f'the classifier has {np.shape(linear)[1]} outputs: pass num_classes={np.shape(linear)[1]}'
    )
  if transposed:
    hints.append(
      'some conv weights look OIHW (PyTorch layout): Haiku wants HWIO, i.e. w.transpose(2, 3, 1, 0)'
    )
  roots = {m.split('/~/')[0] for m in params}
  if misplaced and roots and root not in roots:
    hints.append(
      f"the file's modules live under {sorted(roots)!r}, the model's under "
      f'{root!r}: rename them or pass name='
    )
  if not hints:
    hints.append(
      'check the variant and the model arguments (width, group_size, '
      'final_conv_mult, use_two_convs, ...) the file was trained with'
    )
  kw = ''.join(f', {k}={v!r}' for k, v in sorted(model_kwargs.items()))
  shown = problems[:12]
  more = f'\n  ... and {len(problems) - len(shown)} more' if len(problems) > len(shown) else ''
  raise ParamsMismatchError(
    f'parameters do not match {fam.name}(num_classes={num_classes}, variant={key!r}{kw}).'
    '\nLikely fix: '
    + '; '.join(hints)
    + f'.\n{len(problems)} problem(s):\n  - '
    + '\n  - '.join(shown)
    + more
  )


def _stored_variant(stored: str, path: str) -> str:
  """The canonical name of a converted file's `__variant__` (old files: short names)."""
  try:
    return models.canonical_name(stored)
  except ValueError:
    raise ParamsMismatchError(
      f'{path} was converted for variant {stored!r}, which this version does not know: '
      'pass variant= (and check the file)'
    ) from None


def _check_shapes(
  path: str,
  shapes: Mapping,
  variant: Optional[str],
  num_classes: Optional[int],
  model_kwargs: dict,
) -> tuple[str, int]:
  """Resolves the variant and the class count, and checks `shapes` (a tree of the
  file's arrays or of placeholders of their declared shapes) against the model;
  returns (variant, num_classes). Raises ParamsMismatchError naming `path`."""
  if variant is None:
    variant = guess_variant(shapes, model_kwargs.get('width'))
    if variant is None:
      raise ParamsMismatchError(
        f'cannot tell which variant {path} holds (NFNet F0.., NF-ResNet ResNet50.. or '
        'NF-RegNet B0..): pass variant='
      )
  if num_classes is None:  # whatever the file's classifier has
    head = classifier_module(variant, **model_kwargs)
    bias = shapes.get(head, {}).get('b')
    if bias is None or np.ndim(bias) != 1:
      raise ParamsMismatchError(f'{path} has no classifier bias {head}/b.')
    num_classes = int(np.shape(bias)[0])
  try:
    check_params(shapes, variant, num_classes, **model_kwargs)
  except ParamsMismatchError as e:
    raise ParamsMismatchError(f'{path}: {e}') from None
  return variant, num_classes


def _load_any(
  path, variant: Optional[str], num_classes: Optional[int], verify_md5: bool, model_kwargs: dict
) -> tuple[ParamTree, str]:
  """Loads either format, resolves the variant, checks; returns (params, variant).

  The shapes are checked against the model before the arrays are built: for a
  converted .npz, from the entries' headers, before any data is inflated; for a
  released pickle, from the unpickled placeholders, before any array is allocated."""
  path = os.fspath(path)
  variant = None if variant is None else models.canonical_name(variant)
  if npz.read_head(path).startswith(released.ZIP_MAGIC):
    with npz.ConvertedFile(path) as archive:
      stored = None if archive.variant is None else _stored_variant(archive.variant, path)
      if variant is not None and stored is not None and stored != variant:
        raise ParamsMismatchError(
          f'{path} was converted for variant {stored!r}, but variant={variant!r} was '
          f'asked for: pass variant={stored!r}'
        )
      variant, num_classes = _check_shapes(
        path, archive.shapes(), variant or stored, num_classes, model_kwargs
      )
      params = archive.read_params()
  else:
    if fileio.is_remote(path):
      raise CorruptCheckpointError(
        f'{path} is not a converted .npz; released pickles are read from local disk: '
        'copy it here first (or convert it with nfnet_jax.convert)'
      )

    def check(shapes: Mapping) -> None:
      nonlocal variant, num_classes
      variant, num_classes = _check_shapes(
        path,
        shapes,
        variant or released.released_variant_from_name(path),
        num_classes,
        model_kwargs,
      )

    params = released.load_released_params(path, variant, verify_md5=verify_md5, check=check)
  params = {
    m: {n: np.asarray(v, dtype=np.float32, order='C') for n, v in group.items()}
    for m, group in params.items()
  }
  return params, variant


def load_pretrained(
  path,
  variant: Optional[str] = None,
  num_classes: Optional[int] = 1000,
  *,
  verify_md5: bool = True,
  **model_kwargs,
) -> ParamTree:
  """Loads NFNet, NF-ResNet or NF-RegNet parameters, checked against the model, ready
  for `apply`.

  Accepts DeepMind's released `F{k}_haiku.npz` pickles (loaded with the restricted
  unpickler) and `.npz` files written by `convert` or exported by a training run.

  Args:
    path: the file (a converted .npz may also be remote, e.g. `gs://...`).
    variant: any name `nfnet_jax.models.resolve` accepts ('F0'..'F7+', 'NF-ResNet50' or
      'ResNet50', 'NF-RegNet-B0' or 'B0'); default: the converted file's metadata, else
      the released file name, else the variant the shapes match.
    num_classes: the classifier size to check against (1000 for the releases); None
      takes the file's.
    verify_md5: for released files, warn when the MD5 is not the listed one.
    **model_kwargs: further model arguments the parameters were made with (width,
      group_size, ...).

  Returns:
    {module path: {param name: float32 C-contiguous ndarray}}.
  """
  return _load_any(path, variant, num_classes, verify_md5, model_kwargs)[0]


def load_pretrained_with_variant(
  path,
  variant: Optional[str] = None,
  num_classes: Optional[int] = 1000,
  *,
  verify_md5: bool = True,
  **model_kwargs,
) -> tuple[ParamTree, str]:
  """`load_pretrained`, also returning the variant's canonical name ('F0',
  'NF-RegNet-B0', ...: from the file when `variant` is None). The model class's
  `variant=` argument is `models.resolve(name)[1]`."""
  return _load_any(path, variant, num_classes, verify_md5, model_kwargs)


def _md5(path: str) -> str:
  if not fileio.is_remote(path):
    return released.file_md5(path)
  digest = hashlib.md5(usedforsecurity=False)
  with fileio.gfile().GFile(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def convert(
  src,
  dst,
  variant: Optional[str] = None,
  *,
  overwrite: bool = False,
  num_classes: int = 1000,
  verify_md5: bool = True,
  **model_kwargs,
) -> dict:
  """Loads `src` (released pickle or converted .npz), checks it, writes `dst`.

  Returns a summary: `variant` (canonical name, as stored in `dst`), `family` (e.g.
  'NFRegNet'), `key` (the family's name for it, e.g. 'B0'), number of parameter
  `arrays` and `values`, `dst` and its `md5`."""
  params, variant = _load_any(src, variant, num_classes, verify_md5, model_kwargs)
  dst = npz.save_converted(params, dst, variant, overwrite=overwrite)
  fam, key = models.resolve(variant)
  return dict(
    variant=variant,
    family=fam.name,
    key=key,
    dst=dst,
    arrays=sum(len(g) for g in params.values()),
    values=int(sum(v.size for g in params.values() for v in g.values())),
    md5=_md5(dst),
  )
