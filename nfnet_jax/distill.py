r"""Knowledge distillation: a trained teacher's softened predictions join the labels.

`--config.distill.teacher=WEIGHTS.npz` names a weights file of any NF family (DeepMind's
released `F{k}_haiku.npz`, a converted `.npz`, a run's `params_ema.npz`); the student then
trains on

    (1 - weight) * CE(labels, student) + weight * T^2 * CE(softmax(teacher / T), student / T)

(`losses.distillation_cross_entropy`; Hinton, Vinyals, Dean 2015, arXiv 1503.02531
section 2; He et al. 2018, "Bag of Tricks", arXiv 1812.01187 section 5.4).

The teacher is loaded here once: its family and variant from the file (the `.npz`'s
`__variant__`, a released file's name), the arguments that shape its parameters (`width`,
`group_size`) read off the parameter shapes when the family's defaults do not fit, its
class count from its classifier. Its parameters are not part of the train state, so they
are not checkpointed: the config names the file and a resumed run loads it again. They
reach the mapped train step as a replicated argument (`map_train_step`), so the compiled
program does not embed them as constants and a teacher of any size compiles alike. It runs
in evaluation mode (no stochastic depth or dropout), in the run's compute dtype, and its
logits carry no gradient (`teacher_logits`).
"""

import itertools
from typing import Any, Callable, NamedTuple, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnet_jax import config as config_lib
from nfnet_jax import fileio, models, parallel
from nfnet_jax import weights as weights_lib
from nfnet_jax.weights import check as check_lib
from nfnet_jax.weights import npz, released


class Teacher(NamedTuple):
  """A loaded teacher: its model (`hk.transform`ed, stateless) and host parameters."""

  name: str  # the variant's canonical name, e.g. 'F6', 'NF-RegNet-B0'
  model_config: ml_collections.ConfigDict  # `config.model`-like: name, kwargs
  num_classes: int
  model: hk.Transformed
  params: Any  # {module: {name: float32 ndarray}}


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the config distils from a teacher (`config.distill.teacher` set)."""
  return bool(config.get('distill') and config.distill.teacher)


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for `config.distill`'s values (checked whether or not a teacher is
  set, so that a bad value is caught before it matters)."""
  distill = config.get('distill')
  if distill is None:
    return
  if not 0 <= distill.weight <= 1:
    raise ValueError(
      f"--config.distill.weight must be in [0, 1] (the teacher term's share of the loss), "
      f'got {distill.weight}.'
    )
  if not distill.temperature > 0:
    raise ValueError(f'--config.distill.temperature must be > 0, got {distill.temperature}.')


def check_teacher_file(path: str) -> None:
  if not fileio.exists(path):
    raise FileNotFoundError(
      f'--config.distill.teacher={path} does not exist; give the path of a weights file '
      "(DeepMind F{k}_haiku.npz, a converted .npz or a run's params_ema.npz), or '' to "
      'train without a teacher.'
    )


def _shape_candidates(path: str, variant: str) -> list[dict]:
  """Model arguments that may have made a converted file's parameters: the `width`
  multipliers its stage widths give against the variant's table, the `group_size` its
  blocks' grouped 3x3 convolutions show. Read from the entries' headers: no data."""
  with npz.ConvertedFile(path) as archive:
    shapes = archive.shapes()
  fam, key = models.resolve(variant)
  widths = [None]
  layout = check_lib.block_layout(shapes, fam)  # (stage depths, stage widths)
  if layout and 'width' in fam.defaults:
    table = fam.variants[key]['width']
    widths = sorted({w / t for w, t in zip(layout[1], table)}) or [None]
  groups = [None]
  if 'group_size' in fam.defaults:
    found = {
      int(np.shape(p['w'])[2])
      for module, p in shapes.items()
      if f'/~/{fam.block}' in module
      and np.ndim(p.get('w')) == 4
      and np.shape(p['w'])[:2] == (3, 3)
      and np.shape(p['w'])[2] < np.shape(p['w'])[3]
    }
    groups = sorted(found) or [None]
  return [
    {k: v for k, v in (('width', w), ('group_size', g)) if v is not None}
    for w, g in itertools.product(widths, groups)
  ]


def _load(path: str) -> tuple[Any, str, dict]:
  """(params, canonical variant, model arguments) of the teacher file."""
  try:
    params, variant = weights_lib.load_pretrained_with_variant(path, None, None)
    return params, variant, {}
  except weights_lib.ParamsMismatchError as error:
    # A run's export of a narrower or wider model: the file names the variant but not
    # the arguments it was trained with; they are what its shapes say.
    if not npz.read_head(path).startswith(released.ZIP_MAGIC):
      raise
    with npz.ConvertedFile(path) as archive:
      stored = archive.variant
    if stored is None:
      raise
    variant = models.canonical_name(stored)
    for kwargs in _shape_candidates(path, variant):
      try:
        params, variant = weights_lib.load_pretrained_with_variant(path, variant, None, **kwargs)
      except weights_lib.ParamsMismatchError:
        continue
      return params, variant, kwargs
    raise error from None


def load_teacher(path: str, num_classes: int, dtype: str, student: str = 'the student') -> Teacher:
  """The teacher in `path`, built for `num_classes` classes in compute `dtype`.

  Raises FileNotFoundError for a missing file, ValueError when its classes are not the
  student's (naming both) or its family keeps batch-norm state, and the weights
  package's errors when the file does not fit any model of its variant.
  """
  check_teacher_file(path)
  params, variant, kwargs = _load(path)
  fam, _ = models.resolve(variant)
  if fam.stateful:
    raise ValueError(
      f'--config.distill.teacher={path} is a {variant}, whose batch-norm statistics a '
      'weights file does not hold; distil from an NF model (NFNet, NF-ResNet, NF-RegNet).'
    )
  head = fam.classifier_module(kwargs.get('name'))
  teacher_classes = int(np.shape(params[head]['b'])[0])
  if teacher_classes != num_classes:
    raise ValueError(
      f'--config.distill.teacher={path} is a {variant} with {teacher_classes} classes but '
      f'{student} has {num_classes}: distil from a teacher trained on the same classes.'
    )
  model_config = config_lib.model_config(variant)
  model_config.kwargs.update(kwargs)
  model = models.build_model(model_config, num_classes, dtype)
  return Teacher(variant, model_config, num_classes, model, params)


def teacher_logits(teacher: hk.Transformed, params: Any, images: jax.Array) -> jax.Array:
  """float32 logits of the teacher in evaluation mode (no stochastic depth or dropout,
  hence no rng), with no gradient to anything."""
  logits = teacher.apply(params, None, images, is_training=False)['logits']
  return jax.lax.stop_gradient(logits.astype(jnp.float32))


def map_train_step(
  step_fn: Callable, devices: Sequence, teacher_params: Any, mode: str = parallel.DEFAULT_MODE
) -> Callable:
  """`parallel.map_train_step` for a step `(state, batch, teacher_params)`: the teacher's
  parameters are placed on `devices` once, replicated like the state (never donated),
  and passed to every call as an argument. Returns `(state, batch) -> (state, metrics)`;
  its `mapped` attribute is the three-argument mapped step (e.g. to `.lower` it)."""
  mapped = parallel.map_train_step(step_fn, devices, mode, num_extra_args=1)
  placed = parallel.replicate(teacher_params, devices)

  def train_step(state, batch):
    return mapped(state, batch, placed)

  train_step.mapped = mapped
  train_step.teacher_params = placed
  return train_step
