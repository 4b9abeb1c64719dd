"""Weights in and out of a training run: fine-tuning initialisation and the export.

A run's model is its config's `model` section (`name`, `kwargs.variant`, the other
model arguments). `initial_params` starts a fine-tuning run from a weights file
(`config.init_from`: a released pickle or a converted / exported .npz of any family),
with a fresh classifier when the class count differs; `export_params` writes a finished
run's EMA parameters as `<workdir>/params_ema.npz`, which `load_pretrained`,
`init_from` and `nfnet-classify --weights` read back. For a batch-normalised model the
export also holds the EMA of its moving statistics (npz.py's state entries), which
`load_state_for_model` reads back for evaluation, classification and fine-tuning.
"""

import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from nfnet_jax import models
from nfnet_jax.weights import check, npz, released
from nfnet_jax.weights.errors import ParamsMismatchError

EXPORT_FILE = 'params_ema.npz'


def load_for_model(
  model_config: ml_collections.ConfigDict, path, num_classes: Optional[int]
) -> check.ParamTree:
  """The parameters in `path`, checked against the config's model (`num_classes` None:
  whatever the file's classifier has).

  Raises ValueError when `model.name` and the variant name different families, and
  the weights package's errors when the file does not fit the model.
  """
  fam, key, kwargs = models.model_variant(model_config)
  params, _ = check.load_pretrained_with_variant(
    path, fam.canonical_name(key), num_classes, **kwargs
  )
  return params


def initial_params(
  model_config: ml_collections.ConfigDict, init_from, fresh_params: Any, num_classes: int
) -> Any:
  """The params a fine-tuning run starts from: every weight of `init_from`, except a
  classifier of another size (new classes), which keeps its fresh initialisation.

  Args:
    model_config: the run's `config.model`.
    init_from: the weights file.
    fresh_params: the run's freshly initialised params (on the host).
    num_classes: the run's class count (for the message).

  Returns:
    `fresh_params`' structure with the file's weights, as numpy arrays of
    `fresh_params`' dtypes.
  """
  fam, _, kwargs = models.model_variant(model_config)
  loaded = load_for_model(model_config, init_from, None)
  head = fam.classifier_module(kwargs.get('name'))
  params = dict(loaded)
  if loaded[head]['b'].shape != np.shape(fresh_params[head]['b']):
    logging.warning(
      '%s has %d classes and this run %d: the classifier %s starts fresh.',
      init_from,
      loaded[head]['b'].shape[0],
      num_classes,
      head,
    )
    params[head] = fresh_params[head]
  return jax.tree.map(lambda new, old: np.asarray(new, np.asarray(old).dtype), params, fresh_params)


def load_state_for_model(path, fresh_state: Any) -> Any:
  """The model state (batch norm's moving statistics) stored in the .npz `path`, checked
  against `fresh_state` (the model's initial state: host arrays or ShapeDtypeStructs), as
  numpy arrays of its dtypes; `{}` for a stateless model (the NF families), whatever the
  file holds.

  Raises ParamsMismatchError when the model has state and the file none (a released or
  converted NF file, or an export of an older version) or other state entries."""
  if not jax.tree.leaves(fresh_state):
    return {}
  path = os.fspath(path)
  if not npz.read_head(path).startswith(released.ZIP_MAGIC):
    stored = {}  # a released pickle: NF parameters only
  else:
    with npz.ConvertedFile(path) as archive:
      stored = archive.state_shapes()
      if stored:
        expected = jax.tree.map(lambda x: tuple(x.shape), fresh_state)
        if jax.tree.map(lambda x: tuple(x.shape), stored) != expected:
          raise ParamsMismatchError(
            f'{path}: its batch-norm statistics ({len(jax.tree.leaves(stored))} arrays) do '
            f'not fit the model ({len(jax.tree.leaves(expected))}); check the variant and the '
            'model arguments'
          )
        stored = archive.read_state()
  if not stored:
    raise ParamsMismatchError(
      f'{path} holds no batch-norm statistics (moving mean and variance), which this '
      "batch-normalised model evaluates with: use a run's params_ema.npz exported by this "
      'version, or train the model'
    )
  return jax.tree.map(lambda new, old: np.asarray(new, old.dtype), stored, fresh_state)


def export_params(
  model_config: ml_collections.ConfigDict, params: Any, workdir: str, state: Any = None
) -> Optional[str]:
  """Writes host `params` (a run's EMA params, already fetched from the devices) and, for
  a batch-normalised model, its model `state` (the EMA of the moving statistics) as
  `<workdir>/params_ema.npz`, replacing an older export, atomically, locally or on
  `gs://`. Only process 0 writes; it returns the path, the others None."""
  if jax.process_index() != 0:
    return None
  fam, key, _ = models.model_variant(model_config)
  dst = os.path.join(workdir, EXPORT_FILE)
  return npz.save_converted(params, dst, fam.canonical_name(key), overwrite=True, state=state)
