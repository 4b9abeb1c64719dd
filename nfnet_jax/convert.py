"""Converts DeepMind's released NFNet weights (`F{k}_haiku.npz`, a pickle) to a
pickle-free .npz that `np.load(path, allow_pickle=False)` reads.

  python -m nfnet_jax.convert --variant F0 F0_haiku.npz F0_params.npz
  python -m nfnet_jax.convert [--variant V] [--num-classes N] [--width W]
      [--group-size G] [--overwrite] [--no-verify-md5] SRC DST

The released file is read with nfnet_jax.weights' restricted unpickler (nothing in it
is executed) and checked against the model before anything is written. The output is
written atomically (locally or to gs://) and an existing one is kept unless --overwrite.
"""

import sys
from typing import Optional, Sequence

from absl import flags

from nfnet_jax import cli, weights


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'variant',
    None,
    'variant, e.g. F0 (or NF-ResNet50 / ResNet50, '
    'NF-RegNet-B0 / B0 for converted files of the other families); '
    'default: from the file',
    flag_values=values,
  )
  flags.DEFINE_integer('num_classes', 1000, 'classifier size to check against', flag_values=values)
  flags.DEFINE_float(
    'width',
    None,
    "width multiplier the weights were made with (default: the family's)",
    flag_values=values,
  )
  flags.DEFINE_integer(
    'group_size',
    None,
    "group width the weights were made with (default: the family's)",
    flag_values=values,
  )
  flags.DEFINE_bool('overwrite', False, 'replace an existing DST', flag_values=values)
  flags.DEFINE_bool(
    'no_verify_md5',
    False,
    'skip the MD5 comparison with the (unverified) list of the released files',
    flag_values=values,
  )


def _convert_cli(f: flags.FlagValues, positional: list[str]) -> int:
  if len(positional) != 2:
    raise cli.UserError(
      f'expected SRC and DST, got {len(positional)} positional '
      'argument(s): python -m nfnet_jax.convert [flags] SRC DST'
    )
  src, dst = positional
  model_kwargs = {
    k: v for k, v in (('width', f.width), ('group_size', f.group_size)) if v is not None
  }
  summary = weights.convert(
    src,
    dst,
    f.variant,
    overwrite=f.overwrite,
    num_classes=f.num_classes,
    verify_md5=not f.no_verify_md5,
    **model_kwargs,
  )
  print(
    f'wrote {summary["dst"]}: {summary["family"]}-{summary["key"]}, '
    f'{summary["arrays"]} arrays, {summary["values"]:,} parameters, '
    f'md5 {summary["md5"]}'
  )
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`nfnet-convert [flags] SRC DST`; returns the exit status (1 after one `error: ...`
  line for a bad file, an unknown variant or an existing DST)."""
  return cli.run(
    _convert_cli,
    define_flags,
    argv,
    user_errors=(cli.UserError, ValueError, OSError),
    takes_positional=True,
  )


if __name__ == '__main__':
  sys.exit(main())
