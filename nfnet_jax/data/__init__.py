"""The dataset interface: one set of functions for every source, chosen by data_config.name.

    info = dataset_info(cfg)                      # DatasetInfo(name, num_classes, ...)
    for batch in train_iterator(cfg, per_device_batch=..., local_devices=..., seed=...): ...
    for batch in eval_iterator(cfg, split='test', per_device_batch=..., local_devices=...): ...

See ``pipeline`` for the batch format and ``default_data_config`` for the config fields.
Sources: 'digits' (embedded, ``digits``).
"""
from nfnet_jax.data.pipeline import DatasetInfo
from nfnet_jax.data.pipeline import dataset_info
from nfnet_jax.data.pipeline import default_data_config
from nfnet_jax.data.pipeline import eval_iterator
from nfnet_jax.data.pipeline import eval_steps
from nfnet_jax.data.pipeline import get_source
from nfnet_jax.data.pipeline import known_datasets
from nfnet_jax.data.pipeline import MEAN_RGB
from nfnet_jax.data.pipeline import STDDEV_RGB
from nfnet_jax.data.pipeline import train_iterator
# Importing a source module registers it.
from nfnet_jax.data import digits  # pylint: disable=g-bad-import-order

__all__ = [
    'DatasetInfo', 'dataset_info', 'default_data_config', 'eval_iterator', 'eval_steps',
    'known_datasets', 'MEAN_RGB', 'STDDEV_RGB', 'train_iterator', 'digits',
]
