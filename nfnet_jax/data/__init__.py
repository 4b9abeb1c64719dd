"""The dataset interface: one set of functions for every source, chosen by data_config.name.

    info = dataset_info(cfg)                      # DatasetInfo(name, num_classes, ...)
    for batch in train_iterator(cfg, per_device_batch=..., local_devices=..., seed=...): ...
    for batch in eval_iterator(cfg, split='test', per_device_batch=..., local_devices=...): ...
    image = eval_image(open('cat.jpg', 'rb').read(), 256)   # the paper's eval view, NumPy

See ``pipeline`` for the batch format and ``default_data_config`` for the config fields.
Sources: 'digits' (embedded, the default; ``digits``), 'imagenet2012' and 'tfds:<name>'
(``tfds_source``), 'folder' (your images; ``folder``). Preprocessing ops live in
``preprocess`` (decode, crops, resizes), ``mixing`` (MixUp/CutMix) and ``randaugment``.
"""
from nfnet_jax.data.pipeline import check_and_write_class_index
from nfnet_jax.data.pipeline import DatasetInfo
from nfnet_jax.data.pipeline import dataset_info
from nfnet_jax.data.pipeline import default_data_config
from nfnet_jax.data.pipeline import eval_image_size
from nfnet_jax.data.pipeline import eval_iterator
from nfnet_jax.data.pipeline import eval_steps
from nfnet_jax.data.pipeline import get_source
from nfnet_jax.data.pipeline import known_datasets
from nfnet_jax.data.pipeline import MEAN_RGB
from nfnet_jax.data.pipeline import read_class_index
from nfnet_jax.data.pipeline import split_size
from nfnet_jax.data.pipeline import STDDEV_RGB
from nfnet_jax.data.pipeline import train_iterator
from nfnet_jax.data.pipeline import train_split
from nfnet_jax.data.preprocess import eval_image
# Importing a source module registers it.
from nfnet_jax.data import digits  # pylint: disable=g-bad-import-order
from nfnet_jax.data import tfds_source
from nfnet_jax.data import folder
from nfnet_jax.data.tfds_source import DatasetNotPreparedError

__all__ = [
    'check_and_write_class_index', 'DatasetInfo', 'dataset_info', 'DatasetNotPreparedError',
    'default_data_config', 'eval_image', 'eval_image_size', 'eval_iterator', 'eval_steps',
    'get_source', 'known_datasets', 'MEAN_RGB', 'read_class_index', 'split_size',
    'STDDEV_RGB', 'train_iterator', 'train_split', 'digits', 'tfds_source', 'folder',
]
