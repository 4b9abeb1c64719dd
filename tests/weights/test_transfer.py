"""nfnet_jax.weights.transfer: a fine-tuning run's initial params (`init_from`, with a
fresh classifier for new classes) and a finished run's export (`params_ema.npz`)."""

import logging
import os

import jax
import ml_collections
import numpy as np
import pytest

from nfnet_jax import models, weights
from nfnet_jax.weights import ParamsMismatchError
from tests.weights.helpers import NUM_CLASSES, assert_trees_equal, model_tree


def tree_for(model_config, seed=0, num_classes=NUM_CLASSES):
  kwargs = dict(model_config.kwargs)
  return model_tree(kwargs.pop('variant'), seed, num_classes, **kwargs)


def test_export_then_load_round_trip(tmp_path, model_config):
  tree = tree_for(model_config)
  dst = weights.export_params(model_config, tree, str(tmp_path))
  assert dst == os.path.join(str(tmp_path), weights.EXPORT_FILE)
  assert weights.EXPORT_FILE == 'params_ema.npz'
  fam, key, _ = models.model_variant(model_config)
  params, variant = weights.load_converted(dst)
  assert variant == fam.canonical_name(key)  # the canonical name is stored
  assert_trees_equal(tree, params)
  assert_trees_equal(tree, weights.load_for_model(model_config, dst, NUM_CLASSES))
  assert_trees_equal(tree, weights.load_for_model(model_config, dst, None))
  # A later export replaces the earlier one.
  other = tree_for(model_config, seed=1)
  assert weights.export_params(model_config, other, str(tmp_path)) == dst
  assert_trees_equal(other, weights.load_for_model(model_config, dst, NUM_CLASSES))
  assert os.listdir(tmp_path) == [weights.EXPORT_FILE]


def test_initial_params_take_every_weight_of_the_file(tmp_path, model_config):
  loaded = tree_for(model_config, seed=0)
  fresh = tree_for(model_config, seed=1)
  path = weights.export_params(model_config, loaded, str(tmp_path))
  params = weights.initial_params(model_config, path, fresh, NUM_CLASSES)
  assert_trees_equal(loaded, params)
  assert all(
    type(v) is np.ndarray  # pylint: disable=unidiomatic-typecheck
    for v in jax.tree.leaves(params)
  )


def test_a_classifier_of_another_size_starts_fresh(tmp_path, model_config, caplog):
  loaded = tree_for(model_config, seed=0, num_classes=NUM_CLASSES)
  fresh = tree_for(model_config, seed=1, num_classes=3)
  path = weights.export_params(model_config, loaded, str(tmp_path))
  head = models.get_family(model_config.name).classifier_module()
  with caplog.at_level(logging.WARNING):
    params = weights.initial_params(model_config, path, fresh, 3)
  assert (
    f'has {NUM_CLASSES} classes and this run 3: the classifier {head} starts fresh' in caplog.text
  )
  assert_trees_equal({head: fresh[head]}, {head: params[head]})
  assert_trees_equal(
    {m: p for m, p in loaded.items() if m != head}, {m: p for m, p in params.items() if m != head}
  )


def test_initial_params_take_the_fresh_params_dtypes(tmp_path):
  config = ml_collections.ConfigDict(
    dict(name='NFNet', kwargs=dict(variant='F0', width=0.0625, group_size=8))
  )
  loaded = tree_for(config)
  fresh = jax.tree.map(lambda x: x.astype(np.float16), tree_for(config, seed=1))
  path = weights.export_params(config, loaded, str(tmp_path))
  params = weights.initial_params(config, path, fresh, NUM_CLASSES)
  assert {v.dtype for v in jax.tree.leaves(params)} == {np.dtype(np.float16)}
  np.testing.assert_array_equal(
    params['NFNet/~/linear']['w'], loaded['NFNet/~/linear']['w'].astype(np.float16)
  )


def test_mismatched_families_raise(tmp_path):
  resnet = ml_collections.ConfigDict(
    dict(name='NFResNet', kwargs=dict(variant='ResNet50', width=0.25))
  )
  path = weights.export_params(resnet, tree_for(resnet), str(tmp_path))
  # model.name and the variant disagree: refused before any file is read.
  mixed = ml_collections.ConfigDict(
    dict(name='NFRegNet', kwargs=dict(variant='ResNet50', width=0.25))
  )
  for call in (
    lambda: weights.load_for_model(mixed, path, NUM_CLASSES),
    lambda: weights.initial_params(mixed, path, {}, NUM_CLASSES),
    lambda: weights.export_params(mixed, {}, str(tmp_path / 'x')),
  ):
    with pytest.raises(ValueError, match="is an NFResNet variant but model.name is 'NFRegNet'"):
      call()
  assert not (tmp_path / 'x').exists()
  # A file of another family than the run's model.
  regnet = ml_collections.ConfigDict(dict(name='NFRegNet', kwargs=dict(variant='B0', width=0.25)))
  with pytest.raises(ParamsMismatchError, match="converted for variant 'NF-ResNet50'"):
    weights.load_for_model(regnet, path, NUM_CLASSES)


def test_only_process_zero_exports(tmp_path, monkeypatch):
  config = ml_collections.ConfigDict(
    dict(name='NFNet', kwargs=dict(variant='F0', width=0.0625, group_size=8))
  )
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert weights.export_params(config, tree_for(config), str(tmp_path)) is None
  assert not os.listdir(tmp_path)


def test_export_to_a_remote_workdir():
  """gs:// workdirs work through fileio (ram:// stands in for gs://)."""
  config = ml_collections.ConfigDict(dict(name='NFRegNet', kwargs=dict(variant='B0', width=0.25)))
  workdir = f'ram://weights_transfer_test_{os.getpid()}/run'
  tree = tree_for(config)
  dst = weights.export_params(config, tree, workdir)
  assert dst == f'{workdir}/params_ema.npz'
  assert_trees_equal(tree, weights.load_for_model(config, dst, NUM_CLASSES))
  fresh = tree_for(config, seed=1)
  assert_trees_equal(tree, weights.initial_params(config, dst, fresh, NUM_CLASSES))
