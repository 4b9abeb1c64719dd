"""nfnet_jax.weights.check: parameter trees against the models of every family (the
module names of DeepMind's released code, deepmind-research/nfnets), variant guessing,
`load_pretrained` and `convert`."""

import numpy as np
import pytest

from nfnet_jax import models, weights
from nfnet_jax.weights import ParamsMismatchError, UnverifiedChecksumWarning
from tests.weights.helpers import (
  NARROW,
  NUM_CLASSES,
  assert_trees_equal,
  model_tree,
  released_bytes,
  shape_only_tree,
  write,
)

# The full-size variants checked per family: every one, except NFNets (a minute for all
# sixteen), whose two widths (F0, F0+) and two depths (F0, F1) are covered.
FULL_SIZE_VARIANTS = {'NFNet': ['F0', 'F0+', 'F1']}


def test_narrow_f0_released_file_loads_checked(tmp_path):
  tree = model_tree('F0')
  path = write(tmp_path / 'narrow.pkl', released_bytes(tree))
  with pytest.warns(UnverifiedChecksumWarning, match='CHECKSUM MISMATCH'):
    out = weights.load_pretrained(path, 'F0', NUM_CLASSES, **NARROW)
  assert_trees_equal(tree, out)


def test_check_params_full_size_f0_and_wrong_variant():
  weights.check_params(shape_only_tree('F0'), 'F0')
  f1 = shape_only_tree('F1')
  assert weights.guess_variant(f1) == 'F1'
  assert weights.guess_variant(shape_only_tree('F0+')) == 'F0+'
  with pytest.raises(ParamsMismatchError) as err:
    weights.check_params(f1, 'F0')
  msg = str(err.value)
  assert "variant='F1'" in msg and 'stage depths [2, 4, 12, 6]' in msg
  assert '87 unexpected module(s): ' in msg and 'NFNet/~/nf_block_12, ' in msg
  assert '3 missing module(s): NFNet/~/nf_block_1/~/conv_shortcut' in msg


def test_check_params_names_path_and_both_shapes():
  f0 = weights.expected_param_shapes('F0', NUM_CLASSES, **NARROW)
  f1_tree = model_tree('F1')
  with pytest.raises(ParamsMismatchError) as err:
    weights.check_params(f1_tree, 'F0', NUM_CLASSES, **NARROW)
  msg = str(err.value)
  module, name = next(
    (m, n) for m in f0 for n in f0[m] if m in f1_tree and f1_tree[m][n].shape != f0[m][n]
  )
  assert (
    f'{module}/{name}: expected shape {f0[module][name]}, found {f1_tree[module][name].shape}'
  ) in msg
  assert "pass variant='F1'" in msg


def test_check_params_other_mistakes():
  tree = model_tree('F0')
  weights.check_params(tree, 'F0', NUM_CLASSES, **NARROW)
  with pytest.raises(ParamsMismatchError, match='num_classes=10'):
    weights.check_params(tree, 'F0', 1000, **NARROW)
  bad = {m: dict(p) for m, p in tree.items()}
  del bad['NFNet/~/final_conv']['gain']
  bad['NFNet/~/stem_conv0']['extra'] = np.zeros(2, np.float32)
  bad['NFNet/~/stem_conv1']['w'] = bad['NFNet/~/stem_conv1']['w'].transpose(3, 2, 0, 1)
  bad['NFNet/~/linear']['b'] = bad['NFNet/~/linear']['b'].astype(np.int32)
  with pytest.raises(ParamsMismatchError) as err:
    weights.check_params(bad, 'F0', NUM_CLASSES, **NARROW)
  msg = str(err.value)
  assert 'missing parameter NFNet/~/final_conv/gain' in msg
  assert 'unexpected parameter NFNet/~/stem_conv0/extra' in msg
  assert 'NFNet/~/stem_conv1/w: expected shape (3, 3, 16, 32), found (32, 16, 3, 3)' in msg
  assert 'OIHW' in msg and 'dtype int32' in msg
  renamed = {m.replace('NFNet/', 'nfnet/'): p for m, p in tree.items()}
  with pytest.raises(ParamsMismatchError, match="under 'NFNet'"):
    weights.check_params(renamed, 'F0', NUM_CLASSES, **NARROW)
  # A tree under another root checks against a model given that name.
  weights.check_params(renamed, 'F0', NUM_CLASSES, name='nfnet', **NARROW)
  assert weights.classifier_module('F0', name='nfnet') == 'nfnet/~/linear'
  with pytest.raises(ParamsMismatchError, match="'nfnet'"):
    weights.check_params(tree, 'F0', NUM_CLASSES, name='nfnet', **NARROW)


@pytest.mark.parametrize('family', sorted(models.FAMILIES))
def test_every_family_is_recognised_and_checked(family):
  """Each family's trees (the released code's names) are told apart by their root
  module and recognised by their stage depths and widths, at full size."""
  fam = models.FAMILIES[family]
  variants = FULL_SIZE_VARIANTS.get(family, list(fam.variants))
  trees = {v: shape_only_tree(v) for v in variants}
  for variant, tree in trees.items():
    assert {m.split('/~/')[0] for m in tree} == {fam.root}
    assert weights.guess_variant(tree) == fam.canonical_name(variant)
    weights.check_params(tree, variant)
    weights.check_params(tree, fam.canonical_name(variant))  # any accepted name
    assert weights.classifier_module(variant) == f'{fam.root}/~/linear'
    assert weights.family_of(variant) == family
  # B0 and B1 (F0 and F0+) share stage depths or widths; the other tells them apart.
  right, wrong = variants[:2]
  with pytest.raises(ParamsMismatchError) as err:
    weights.check_params(trees[right], wrong)
  msg = str(err.value)
  assert f"pass variant='{fam.canonical_name(right)}'" in msg
  assert msg.startswith(f'parameters do not match {family}(')


@pytest.mark.parametrize('family', sorted(models.FAMILIES))
def test_guess_variant_reads_the_family_record(family):
  """The block module name and the default width come from the family's record."""
  fam = models.FAMILIES[family]
  key = next(iter(fam.variants))
  width = fam.defaults['width'] / 4
  tree = model_tree(key, width=width)
  assert any(m.split('/~/')[1].startswith(fam.block) for m in tree if '/~/' in m)
  assert weights.guess_variant(tree, width=width) == fam.canonical_name(key)
  assert weights.guess_variant(tree) == fam.canonical_name(key)  # same proportions
  assert weights.guess_variant({'Other/~/linear': {'w': np.zeros((2, 2))}}) is None


def test_family_mix_ups_are_named():
  resnet = shape_only_tree('ResNet50')
  with pytest.raises(ParamsMismatchError) as err:
    weights.check_params(resnet, 'F0')
  msg = str(err.value)
  assert "under ['NF_ResNet']" in msg and "'NFNet'" in msg
  with pytest.raises(ValueError) as err:
    weights.expected_param_shapes('ResNet18')
  assert all(v in str(err.value) for v in ('F0', 'ResNet50', 'B0'))
  # An argument of another family's model: a clear error, not a TypeError.
  with pytest.raises(ParamsMismatchError, match='group_size'):
    weights.expected_param_shapes('ResNet50', 10, group_size=8)


def test_narrow_nf_regnet_round_trip_without_naming_the_variant(tmp_path):
  tree = model_tree('B2', width=0.25)
  assert weights.guess_variant(tree, width=0.25) == 'NF-RegNet-B2'
  assert weights.guess_variant(tree) == 'NF-RegNet-B2'  # another width: same proportions
  dst = weights.save_converted(tree, tmp_path / 'b2.npz', 'NF-RegNet-B2')
  loaded, variant = weights.load_pretrained_with_variant(dst, num_classes=None, width=0.25)
  assert variant == 'NF-RegNet-B2'
  assert_trees_equal(tree, loaded)
  with pytest.raises(ParamsMismatchError, match="converted for variant 'NF-RegNet-B2'"):
    weights.load_pretrained(dst, 'B3', width=0.25)


@pytest.mark.parametrize(
  'stored,asked', [('B2', None), ('B2', 'NF-RegNet-B2'), ('NF-RegNet-B2', 'B2')]
)
def test_files_with_short_variant_names_still_load(tmp_path, stored, asked):
  """Files written before the canonical names stored short ones ('B0', 'ResNet50')."""
  tree = model_tree('B2', width=0.25)
  dst = weights.save_converted(tree, tmp_path / 'b2.npz', stored)
  loaded, variant = weights.load_pretrained_with_variant(dst, asked, num_classes=None, width=0.25)
  assert variant == 'NF-RegNet-B2'
  assert_trees_equal(tree, loaded)


def test_unknown_stored_variant(tmp_path):
  dst = weights.save_converted(model_tree('F0'), tmp_path / 'x.npz', 'EfficientNet-B9')
  with pytest.raises(ParamsMismatchError, match="'EfficientNet-B9', which this version"):
    weights.load_pretrained(dst, num_classes=NUM_CLASSES, **NARROW)


# ---------------------------------------------------------------------------
# Conversion.


def test_convert_round_trip_and_overwrite(tmp_path):
  tree = model_tree('F0', seed=3)
  src = write(tmp_path / 'F0_haiku.npz', released_bytes(tree))
  dst = tmp_path / 'F0_params.npz'
  with pytest.warns(UnverifiedChecksumWarning):
    summary = weights.convert(src, dst, num_classes=NUM_CLASSES, **NARROW)
  assert summary['variant'] == 'F0'  # from the file name
  assert (summary['family'], summary['key']) == ('NFNet', 'F0')
  assert summary['values'] == sum(v.size for p in tree.values() for v in p.values())
  assert summary['md5'] == weights.file_md5(dst)
  with np.load(dst, allow_pickle=False) as archive:
    assert str(archive['__variant__']) == 'F0'
    flat = {k: archive[k] for k in archive.files}
  assert (
    flat['NFNet/~/nf_block_1/~/conv1//w'].shape == tree['NFNet/~/nf_block_1/~/conv1']['w'].shape
  )
  assert_trees_equal(tree, weights.unflatten_params(flat))
  # The variant comes from the file's metadata.
  loaded = weights.load_pretrained(dst, num_classes=NUM_CLASSES, **NARROW)
  assert_trees_equal(tree, loaded)
  with pytest.raises(ParamsMismatchError, match="converted for variant 'F0'"):
    weights.load_pretrained(dst, 'F1', NUM_CLASSES, **NARROW)

  before = dst.read_bytes()
  with pytest.raises(FileExistsError, match='overwrite'):
    weights.convert(src, dst, 'F0', num_classes=NUM_CLASSES, verify_md5=False, **NARROW)
  assert dst.read_bytes() == before
  other = model_tree('F0', seed=4)
  write(src, released_bytes(other))
  weights.convert(
    src, dst, 'F0', overwrite=True, num_classes=NUM_CLASSES, verify_md5=False, **NARROW
  )
  assert_trees_equal(other, weights.load_pretrained(dst, 'F0', NUM_CLASSES, **NARROW))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['F0_haiku.npz', 'F0_params.npz']


def test_convert_stores_the_canonical_name(tmp_path):
  tree = model_tree('ResNet50', width=0.25)
  src = weights.save_converted(tree, tmp_path / 'old.npz', 'ResNet50')
  summary = weights.convert(src, tmp_path / 'new.npz', num_classes=NUM_CLASSES, width=0.25)
  assert (summary['variant'], summary['family'], summary['key']) == (
    'NF-ResNet50',
    'NFResNet',
    'ResNet50',
  )
  with np.load(tmp_path / 'new.npz', allow_pickle=False) as archive:
    assert str(archive['__variant__']) == 'NF-ResNet50'


def test_convert_refuses_unchecked_params(tmp_path):
  src = write(tmp_path / 'x.pkl', released_bytes(model_tree('F1')))
  with pytest.raises(ParamsMismatchError):
    weights.convert(
      src, tmp_path / 'out.npz', 'F0', num_classes=NUM_CLASSES, verify_md5=False, **NARROW
    )
  assert not (tmp_path / 'out.npz').exists()
  assert [p.name for p in tmp_path.iterdir()] == ['x.pkl']
