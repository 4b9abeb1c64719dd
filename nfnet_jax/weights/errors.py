"""The errors and the warning of the weights package, importable without the models.

`released.py` (NumPy and the standard library only) raises them as well as `check.py`
and `npz.py`, so they live here rather than beside the model checks.
"""

import pickle


class PretrainedError(ValueError):
  """A checkpoint file could not be used (base class of the errors below)."""


class UnsafePickleError(PretrainedError, pickle.UnpicklingError):
  """The pickle references a global or opcode that a parameter file does not need."""


class CorruptCheckpointError(PretrainedError):
  """The file is empty, truncated, not a pickle / .npz, or not a parameter tree."""


class ParamsMismatchError(PretrainedError):
  """The parameters do not match the model's module paths, names or shapes."""


class UnverifiedChecksumWarning(UserWarning):
  """A released file's MD5 differs from the (unverified) third-party list."""
