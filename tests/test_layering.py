"""Imports run one way: utilities <- models, data, optim <- weights, config <- the trainer's
parts <- the trainer <- the tools. A module may import its own layer or lower ones only."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'nfnet_jax')

# Lowest first. A package name stands for every module in it.
LAYERS = [
  {'nfnet_jax.fileio', 'nfnet_jax.cli', 'nfnet_jax.published', 'nfnet_jax.hostmem'},
  {
    'nfnet_jax.models',
    'nfnet_jax.data',
    'nfnet_jax.optim',
    'nfnet_jax.fused_sgd',
    'nfnet_jax.sam',
    'nfnet_jax.losses',
  },
  {'nfnet_jax.weights', 'nfnet_jax.config'},
  {
    'nfnet_jax.parallel',
    'nfnet_jax.checkpoint',
    'nfnet_jax.metrics',
    'nfnet_jax.steps',
    'nfnet_jax.distill',
    'nfnet_jax.workdir',
    'nfnet_jax.provenance',
  },
  {'nfnet_jax.train'},
  {
    'nfnet_jax.classify',
    'nfnet_jax.convert',
    'nfnet_jax.benchmark',
    'nfnet_jax.timm_compare',
    'nfnet_jax.throughput',
    'nfnet_jax.plot',
    'nfnet_jax.spp',
  },
]


def _layer(module: str) -> int:
  for i, layer in enumerate(LAYERS):
    if any(module == name or module.startswith(name + '.') for name in layer):
      return i
  raise AssertionError(f'{module} is in no layer: add it to LAYERS')


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3]
        name = rel.replace(os.sep, '.').removesuffix('.__init__')
        yield name, os.path.join(root, f)


def _imports(path: str, package: str) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        base = '.'.join(package.split('.')[: len(package.split('.')) - node.level + 1] + [base])
      found |= {f'{base}.{a.name}' for a in node.names} | {base}
  return {m for m in found if m.startswith('nfnet_jax.')}


MODULES = dict(_modules())


@pytest.mark.parametrize('module', sorted(m for m in MODULES if m != 'nfnet_jax'))
def test_no_upward_imports(module):
  own = _layer(module)
  upward = sorted(m for m in _imports(MODULES[module], module) if _layer(m) > own)
  assert not upward, f'{module} (layer {own}) imports {upward} from above it'


def test_models_and_weights_formats_stand_alone():
  """The released-file reader imports NumPy and the standard library only (it must be
  safe to audit on its own), and the models import neither data nor training."""
  released = _imports(MODULES['nfnet_jax.weights.released'], 'nfnet_jax.weights.released')
  assert all(m.startswith('nfnet_jax.weights.errors') for m in released), released
  for name, path in MODULES.items():
    if name.startswith('nfnet_jax.models'):
      assert all(m.startswith('nfnet_jax.models') for m in _imports(path, name)), name
