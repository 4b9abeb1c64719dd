"""Model weights: DeepMind's released files, the package's .npz format, checks, transfer.

released.py   the restricted unpickler for DeepMind's `F{k}_haiku.npz` (NumPy only)
npz.py        the pickle-free `.npz` format (flat '//' keys, `__variant__`)
check.py      shapes against a model, variant guessing, `load_pretrained`, `convert`
transfer.py   fine-tuning initialisation (`initial_params`) and `export_params`
timm.py       timm's `dm_nfnet_f*` safetensors (PyTorch layout) -> the NFNet tree
errors.py     the errors all of them raise
"""

from nfnet_jax.weights.check import (
  check_params,
  classifier_module,
  convert,
  expected_param_shapes,
  family_of,
  guess_variant,
  load_pretrained,
  load_pretrained_with_variant,
)
from nfnet_jax.weights.errors import (
  CorruptCheckpointError,
  ParamsMismatchError,
  PretrainedError,
  UnsafePickleError,
  UnverifiedChecksumWarning,
)
from nfnet_jax.weights.npz import (
  SEPARATOR,
  flatten_params,
  load_converted,
  save_converted,
  unflatten_params,
)
from nfnet_jax.weights.released import (
  ADMITTED_GLOBALS,
  RELEASED_MD5,
  RELEASED_SIZES,
  SafeUnpickler,
  file_md5,
  load_released_params,
  released_variant_from_name,
)
from nfnet_jax.weights.timm import convert_timm, load_timm
from nfnet_jax.weights.transfer import (
  EXPORT_FILE,
  export_params,
  initial_params,
  load_for_model,
  load_state_for_model,
)

__all__ = [
  'ADMITTED_GLOBALS',
  'RELEASED_MD5',
  'RELEASED_SIZES',
  'SEPARATOR',
  'EXPORT_FILE',
  'PretrainedError',
  'UnsafePickleError',
  'CorruptCheckpointError',
  'ParamsMismatchError',
  'UnverifiedChecksumWarning',
  'SafeUnpickler',
  'load_released_params',
  'load_pretrained',
  'load_pretrained_with_variant',
  'check_params',
  'expected_param_shapes',
  'classifier_module',
  'family_of',
  'guess_variant',
  'flatten_params',
  'unflatten_params',
  'save_converted',
  'load_converted',
  'convert',
  'file_md5',
  'released_variant_from_name',
  'load_for_model',
  'load_state_for_model',
  'initial_params',
  'export_params',
  'load_timm',
  'convert_timm',
]
