"""Converts DeepMind's released NFNet weights (`F{k}_haiku.npz`, a pickle), or timm's
PyTorch port of them (`dm_nfnet_f{k}`, a .safetensors file), to a pickle-free .npz that
`np.load(path, allow_pickle=False)` reads.

  python -m nfnet_jax.convert --variant F0 F0_haiku.npz F0_params.npz
  python -m nfnet_jax.convert [--variant V] [--num-classes N] [--width W]
      [--group-size G] [--overwrite] [--no-verify-md5] SRC DST
  python -m nfnet_jax.convert --from-timm model.safetensors [--variant F0] [--out DST]

The released file is read with nfnet_jax.weights' restricted unpickler (nothing in it
is executed), timm's with safetensors (no PyTorch: names and layouts are mapped as
nfnet_jax/weights/timm.py describes), and either is checked against the model before
anything is written. The output is written atomically (locally or to gs://) and an
existing one is kept unless --overwrite. DST may be given as --out instead; with
--from-timm it defaults to the input's name with the suffix .npz.
"""

import os
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
  flags.DEFINE_string(
    'from_timm',
    None,
    "timm's dm_nfnet_f0..f6 weights (.safetensors) to convert instead of a SRC",
    flag_values=values,
  )
  flags.DEFINE_string(
    'out', None, 'DST (instead of the last positional argument)', flag_values=values
  )
  flags.DEFINE_bool('overwrite', False, 'replace an existing DST', flag_values=values)
  flags.DEFINE_bool(
    'no_verify_md5',
    False,
    'skip the MD5 comparison with the (unverified) list of the released files',
    flag_values=values,
  )


def _src_and_dst(f: flags.FlagValues, positional: list[str]) -> tuple[str, str]:
  """SRC and DST from `SRC DST`, `SRC --out DST`, `--from-timm SRC [DST | --out DST]`."""
  given = ([f.from_timm] if f.from_timm else []) + positional + ([f.out] if f.out else [])
  if len(given) == 1 and f.from_timm:  # DST beside the input
    return f.from_timm, os.path.splitext(f.from_timm)[0] + '.npz'
  if len(given) != 2:
    raise cli.UserError(
      f'expected SRC and DST, got {len(given)} file name(s) {given}: python -m '
      'nfnet_jax.convert [flags] SRC DST (or --from-timm FILE.safetensors [--out DST])'
    )
  return given[0], given[1]


def _convert_cli(f: flags.FlagValues, positional: list[str]) -> int:
  src, dst = _src_and_dst(f, positional)
  model_kwargs = {
    k: v for k, v in (('width', f.width), ('group_size', f.group_size)) if v is not None
  }
  if f.from_timm:
    summary = weights.convert_timm(
      src, dst, f.variant, overwrite=f.overwrite, num_classes=f.num_classes, **model_kwargs
    )
  else:
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
