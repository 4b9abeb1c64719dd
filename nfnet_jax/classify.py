"""Classify images with NFNet (or NF-ResNet, NF-RegNet) weights: top-k class names.

  python -m nfnet_jax.classify --variant F0 --weights F0_haiku.npz cat.jpg photos/
  nfnet-classify --variant F0 --weights F0_params.npz --json photos/ > predictions.json

Weights: DeepMind's released `F{k}_haiku.npz` (read with the restricted unpickler) or a
file written by `nfnet-convert`. Each image gets the evaluation preprocessing the
published accuracies were measured with (at the variant's test size, `resize_crop_32`
for NFNets and `crop_resize` for NF-ResNets/NF-RegNets as in DeepMind's experiments; see
nfnet_jax.data.preprocess), then the top-k ImageNet classes (the 1000 names ship with
the package). For weights fine-tuned on your own classes pass --class-index with the
`class_index.json` of the training workdir (or the workdir itself) and --num-classes is
taken from it. Folders are searched recursively for .jpg/.jpeg/.png/.gif/.bmp files.
Images that do not decode are reported (and the exit status is 1) without stopping the
others.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnet_jax import models
from nfnet_jax import pretrained
from nfnet_jax.data.folder import IMAGE_EXTENSIONS
from nfnet_jax.data.pipeline import EVAL_METHODS


# The evaluation view each family's published accuracies were measured with.
EVAL_VIEW = {'NFNet': 'resize_crop_32', 'NFResNet': 'crop_resize', 'NFRegNet': 'crop_resize'}


def find_images(inputs: Sequence[str]) -> list[str]:
  """Files as given; folders searched recursively for images (sorted)."""
  found = []
  for item in inputs:
    if os.path.isdir(item):
      for dirpath, dirnames, files in os.walk(item):
        dirnames.sort()   # a stable order, whatever the file system's
        found += sorted(os.path.join(dirpath, f) for f in files
                        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
    elif os.path.exists(item):
      found.append(item)
    else:
      raise FileNotFoundError(f'{item}: no such file or folder.')
  return found


def load_class_names(class_index: Optional[str]) -> list[str]:
  """ImageNet's 1000 names (first synonym), or a training workdir's class_index.json."""
  if class_index:
    from nfnet_jax import data  # pylint: disable=g-import-not-at-top
    workdir = class_index if os.path.isdir(class_index) else os.path.dirname(class_index)
    return data.read_class_index(workdir or '.')
  from nfnet_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return [name.split(',')[0] for name in tfds_source.imagenet_classes()[1]]


def classify(paths: Sequence[str], params, *, variant: str = 'F0',
             class_names: Sequence[str], image_size: int = 0,
             method: Optional[str] = None, crop_pct: float = 0.875, top_k: int = 5,
             batch_size: int = 16, dtype: str = 'float32',
             model_kwargs: Optional[dict] = None) -> list[dict]:
  """Top-k predictions per image: [{'path', 'predictions': [{'label', 'class',
  'probability'}]}, or {'path', 'error'} for an image that does not decode]."""
  from nfnet_jax import data  # pylint: disable=g-import-not-at-top
  image_size = image_size or models.variant_params(variant)['test_imsize']
  family = models.family_of_variant(variant)
  method = method or EVAL_VIEW[family]
  num_classes = len(class_names)
  model_config = ml_collections.ConfigDict(dict(
      name=family,
      kwargs=dict(variant=variant, **(model_kwargs or {}))))
  model = models.build_model(model_config, num_classes, dtype)
  predict = jax.jit(lambda p, x: jax.nn.softmax(
      model.apply(p, None, x, is_training=False)['logits'].astype(jnp.float32)))
  k = min(top_k, num_classes)

  results, batch, owners = [], [], []

  def flush():
    if not batch:
      return
    # Pad to a fixed batch: one compilation for every batch, the last one included.
    images = np.stack(batch + [np.zeros_like(batch[0])] * (batch_size - len(batch)))
    probs = np.asarray(predict(params, images))[:len(batch)]
    for i, p in zip(owners, probs):
      top = np.argsort(-p, kind='stable')[:k]
      results[i]['predictions'] = [
          {'label': int(c), 'class': class_names[c], 'probability': float(p[c])} for c in top]
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='nfnet-classify', description=__doc__.split('\n\n')[0])
  p.add_argument('images', nargs='+', help='image files or folders')
  p.add_argument('--weights', required=True, help='F{k}_haiku.npz or a converted .npz')
  p.add_argument('--variant', default=None,
                 help='F0..F7+, ResNet50..ResNet600 or B0..B8 (default: from the weights file)')
  p.add_argument('--top-k', type=int, default=5)
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--image-size', type=int, default=0,
                 help="evaluation size (default: the variant's test size)")
  p.add_argument('--eval-preprocess', default=None, choices=EVAL_METHODS,
                 help="default: the variant family's (NFNet resize_crop_32, else crop_resize)")
  p.add_argument('--crop-pct', type=float, default=0.875)
  p.add_argument('--class-index', default=None,
                 help="class_index.json of a training workdir (default: ImageNet's 1000)")
  p.add_argument('--dtype', default='float32', choices=models.DTYPES)
  p.add_argument('--width', type=float, default=None, help='width the weights were made with')
  p.add_argument('--group-size', type=int, default=None)
  p.add_argument('--json', action='store_true', help='print one JSON list instead of text')
  args = p.parse_args(argv)
  model_kwargs = {k: v for k, v in (('width', args.width), ('group_size', args.group_size))
                  if v is not None}
  try:
    class_names = load_class_names(args.class_index)
    paths = find_images(args.images)
    if not paths:
      raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {args.images}.')
    params, variant = pretrained.load_pretrained_with_variant(
        args.weights, args.variant, num_classes=len(class_names), **model_kwargs)
    results = classify(paths, params, variant=variant, class_names=class_names,
                       image_size=args.image_size, method=args.eval_preprocess,
                       crop_pct=args.crop_pct, top_k=args.top_k, batch_size=args.batch_size,
                       dtype=args.dtype, model_kwargs=model_kwargs)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(results, indent=1))
  else:
    for r in results:
      print(r['path'])
      if 'error' in r:
        print(f"  error: {r['error']}")
        continue
      for rank, pred in enumerate(r['predictions'], 1):
        print(f"  {rank}. {pred['class']:<40s} {100 * pred['probability']:6.2f}%")
  return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
  sys.exit(main())
