"""Classify images with NFNet (or NF-ResNet, NF-RegNet) weights: top-k class names.

  python -m nfnet_jax.classify --variant F0 --weights F0_haiku.npz cat.jpg photos/
  nfnet-classify --variant F0 --weights F0_params.npz --json photos/ > predictions.json

Weights: DeepMind's released `F{k}_haiku.npz` (read with the restricted unpickler) or a
file written by `nfnet-convert`. Each image gets the evaluation preprocessing the
published accuracies were measured with (at the variant's test size, each family's
`Family.eval_view`: `resize_crop_32` for NFNets and `crop_resize` for NF-ResNets and
NF-RegNets, as in DeepMind's experiments; see nfnet_jax.data.preprocess), then the
top-k ImageNet classes (the 1000 names ship with the package). For weights fine-tuned
on your own classes pass --class-index with the `class_index.json` of the training
workdir (or the workdir itself); the number of classes is taken from it. Folders are
searched recursively for .jpg/.jpeg/.png/.gif/.bmp files. Images that do not decode are
reported (and the exit status is 1) without stopping the others.
"""

import json
import os
import sys
from typing import Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnet_jax import checkpoint, cli, data, models, weights


def find_images(inputs: Sequence[str]) -> list[str]:
  """Files as given; folders searched recursively for images (sorted)."""
  found = []
  for item in inputs:
    if os.path.isdir(item):
      for dirpath, dirnames, files in os.walk(item):
        dirnames.sort()  # a stable order, whatever the file system's
        found += sorted(
          os.path.join(dirpath, f)
          for f in files
          if f.lower().endswith(data.IMAGE_EXTENSIONS) and not f.startswith('.')
        )
    elif os.path.exists(item):
      found.append(item)
    else:
      raise FileNotFoundError(f'{item}: no such file or folder.')
  return found


def load_class_names(class_index: Optional[str]) -> list[str]:
  """ImageNet's 1000 names (first synonym), or a training workdir's class_index.json."""
  if class_index:
    workdir = class_index if os.path.isdir(class_index) else os.path.dirname(class_index)
    return checkpoint.read_class_index(workdir or '.')
  return [name.split(',')[0] for name in data.imagenet_classes()[1]]


def classify(
  paths: Sequence[str],
  params,
  *,
  variant: str = 'F0',
  class_names: Sequence[str],
  image_size: int = 0,
  method: Optional[str] = None,
  crop_pct: float = 0.875,
  top_k: int = 5,
  batch_size: int = 16,
  dtype: str = 'float32',
  model_kwargs: Optional[dict] = None,
  model_state=None,
) -> list[dict]:
  """Top-k predictions per image: [{'path', 'predictions': [{'label', 'class',
  'probability'}]}, or {'path', 'error'} for an image that does not decode].

  `model_state`: a batch-normalised model's moving statistics (`model_state_for`);
  None for the NF families."""
  family, key = models.resolve(variant)
  image_size = image_size or family.variants[key]['test_imsize']
  method = method or family.eval_view
  num_classes = len(class_names)
  model_config = ml_collections.ConfigDict(
    dict(name=family.name, kwargs=dict(variant=key, **(model_kwargs or {})))
  )
  if family.stateful and model_state is None:
    raise ValueError(
      f'{family.canonical_name(key)} normalises with its batch-norm statistics: pass '
      'model_state (classify.model_state_for reads them from the weights file).'
    )
  model = models.build_model_with_state(model_config, num_classes, dtype)
  predict = jax.jit(
    lambda p, x: jax.nn.softmax(
      model.apply(p, model_state or {}, None, x, is_training=False)[0]['logits'].astype(jnp.float32)
    )
  )
  k = min(top_k, num_classes)

  results, batch, owners = [], [], []

  def flush():
    if not batch:
      return
    # Pad to a fixed batch: one compilation for every batch, the last one included.
    images = np.stack(batch + [np.zeros_like(batch[0])] * (batch_size - len(batch)))
    probs = np.asarray(predict(params, images))[: len(batch)]
    for i, p in zip(owners, probs):
      top = np.argsort(-p, kind='stable')[:k]
      results[i]['predictions'] = [
        {'label': int(c), 'class': class_names[c], 'probability': float(p[c])} for c in top
      ]
    batch.clear()
    owners.clear()

  for path in paths:
    results.append({'path': path})
    try:
      with open(path, 'rb') as f:
        image = data.eval_image(f.read(), image_size, method, crop_pct)
    except (ValueError, OSError) as e:
      results[-1]['error'] = str(e).splitlines()[0]
      continue
    batch.append(image)
    owners.append(len(results) - 1)
    if len(batch) == batch_size:
      flush()
  flush()
  return results


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'weights', None, 'F{k}_haiku.npz or a converted .npz', required=True, flag_values=values
  )
  flags.DEFINE_string(
    'variant',
    None,
    'F0..F7+, NF-ResNet50.. (ResNet50..) or NF-RegNet-B0.. (B0..); default: from the weights file',
    flag_values=values,
  )
  flags.DEFINE_integer('top_k', 5, 'how many classes to list per image', flag_values=values)
  flags.DEFINE_integer('batch_size', 16, 'images per forward pass', flag_values=values)
  flags.DEFINE_integer(
    'image_size', 0, "evaluation size (default: the variant's test size)", flag_values=values
  )
  flags.DEFINE_enum(
    'eval_preprocess',
    None,
    list(data.EVAL_METHODS),
    "default: the variant's family's (NFNet resize_crop_32, else crop_resize)",
    flag_values=values,
  )
  flags.DEFINE_float('crop_pct', 0.875, 'for --eval-preprocess crop_pct', flag_values=values)
  flags.DEFINE_string(
    'class_index',
    None,
    "class_index.json of a training workdir (or the workdir; default: ImageNet's 1000)",
    flag_values=values,
  )
  flags.DEFINE_enum('dtype', 'float32', list(models.DTYPES), 'compute dtype', flag_values=values)
  flags.DEFINE_float('width', None, 'width the weights were made with', flag_values=values)
  flags.DEFINE_integer(
    'group_size', None, 'group size the weights were made with', flag_values=values
  )
  flags.DEFINE_bool('json', False, 'print one JSON list instead of text', flag_values=values)


def model_state_for(path: str, variant: str, num_classes: int, model_kwargs=None):
  """The model state stored with the weights in `path` for `variant` (batch norm's
  moving statistics), or None for a stateless (NF) family."""
  family, key = models.resolve(variant)
  if not family.stateful:
    return None
  model_config = ml_collections.ConfigDict(
    dict(name=family.name, kwargs=dict(variant=key, **(model_kwargs or {})))
  )
  model = models.build_model_with_state(model_config, num_classes)
  size = family.variants[key]['test_imsize']
  _, fresh = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), is_training=False)
  )
  return weights.load_state_for_model(path, fresh)


def _classify_cli(f: flags.FlagValues, images: list[str]) -> int:
  if not images:
    raise cli.UserError('give image files or folders to classify.')
  model_kwargs = {
    k: v for k, v in (('width', f.width), ('group_size', f.group_size)) if v is not None
  }
  class_names = load_class_names(f.class_index)
  paths = find_images(images)
  if not paths:
    raise FileNotFoundError(f'no images ({", ".join(data.IMAGE_EXTENSIONS)}) in {images}.')
  params, variant = weights.load_pretrained_with_variant(
    f.weights, f.variant, num_classes=len(class_names), **model_kwargs
  )
  results = classify(
    paths,
    params,
    variant=variant,
    class_names=class_names,
    image_size=f.image_size,
    method=f.eval_preprocess,
    crop_pct=f.crop_pct,
    top_k=f.top_k,
    batch_size=f.batch_size,
    dtype=f.dtype,
    model_kwargs=model_kwargs,
    model_state=model_state_for(f.weights, variant, len(class_names), model_kwargs),
  )
  if f.json:
    print(json.dumps(results, indent=1))
  else:
    for r in results:
      print(r['path'])
      if 'error' in r:
        print(f'  error: {r["error"]}')
        continue
      for rank, pred in enumerate(r['predictions'], 1):
        print(f'  {rank}. {pred["class"]:<40s} {100 * pred["probability"]:6.2f}%')
  return 1 if any('error' in r for r in results) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`nfnet-classify [flags] IMAGE_OR_FOLDER...`; returns the exit status."""
  return cli.run(
    _classify_cli,
    define_flags,
    argv,
    user_errors=(cli.UserError, ValueError, OSError),
    takes_positional=True,
  )


if __name__ == '__main__':
  sys.exit(main())
