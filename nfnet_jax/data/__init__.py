"""The dataset interface: one set of functions for every source, chosen by data_config.name.

    info = dataset_info(cfg)                      # DatasetInfo(name, num_classes, ...)
    for batch in train_iterator(cfg, per_device_batch=..., local_devices=..., seed=...,
                                start_step=...): ...    # resumes exactly at start_step
    for batch in eval_iterator(cfg, split='test', per_device_batch=..., local_devices=...): ...
    eval_iterator(cfg, split='imagenet_v2', ...)  # or another dataset of the same classes
    image = eval_image(open('cat.jpg', 'rb').read(), 256)   # the paper's eval view, NumPy

Modules: ``sources`` (the DataSource interface, the registry of sources and
``default_data_config``, the config fields), ``pipeline`` (the iterators and the batch
format), ``preprocess`` (decoding, crops, resizes, normalisation), ``augment``
(MixUp/CutMix and RandAugment), and the sources ``digits`` (embedded, the default),
``tfds_source`` ('imagenet2012', 'tfds:<name>') and ``folder`` (your images).

The names below are handed on from their modules when first used, so that importing
one module (``preprocess`` to classify an image, ``digits`` to write a folder) does not
import the others.
"""

import importlib

_HOMES = {
  'DatasetInfo': 'sources',
  'EVAL_DATASETS': 'sources',
  'check_eval_split': 'sources',
  'dataset_info': 'sources',
  'default_data_config': 'sources',
  'eval_image_size': 'sources',
  'get_source': 'sources',
  'known_datasets': 'sources',
  'parse_eval_splits': 'sources',
  'split_size': 'sources',
  'train_split': 'sources',
  'eval_iterator': 'pipeline',
  'eval_steps': 'pipeline',
  'train_iterator': 'pipeline',
  'EVAL_METHODS': 'preprocess',
  'eval_image': 'preprocess',
  'MEAN_RGB': 'preprocess',
  'STDDEV_RGB': 'preprocess',
  'IMAGE_EXTENSIONS': 'folder',
  'DatasetNotPreparedError': 'tfds_source',
  'imagenet_classes': 'tfds_source',
}
_MODULES = ('augment', 'digits', 'folder', 'pipeline', 'preprocess', 'sources', 'tfds_source')

__all__ = sorted(_HOMES) + list(_MODULES)


def __getattr__(name):
  if name in _HOMES:
    value = getattr(importlib.import_module(f'{__name__}.{_HOMES[name]}'), name)
  elif name in _MODULES:
    value = importlib.import_module(f'{__name__}.{name}')
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
