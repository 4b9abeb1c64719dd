"""Fixtures of the weights tests: a narrow model config of each family."""

import ml_collections
import pytest

from nfnet_jax import models

# Model arguments that make each family's first variant small enough for quick tests;
# a family without an entry is tested at its released arguments.
NARROW_KWARGS = {
  'NFNet': dict(width=0.0625, group_size=8),
  'NFResNet': dict(width=0.25),
  'NFRegNet': dict(width=0.25),
}


@pytest.fixture(params=sorted(models.FAMILIES))
def model_config(request) -> ml_collections.ConfigDict:
  """`config.model` of a narrow model of each family (its table's first variant, by
  the name the family's configs use: the table's key)."""
  fam = models.FAMILIES[request.param]
  return ml_collections.ConfigDict(
    dict(
      name=fam.name,
      kwargs=dict(variant=next(iter(fam.variants)), **NARROW_KWARGS.get(fam.name, {})),
    )
  )
