"""Converts DeepMind's released NFNet weights (`F{k}_haiku.npz`, a pickle) to a
pickle-free .npz that `np.load(path, allow_pickle=False)` reads.

  python -m nfnet_jax.convert --variant F0 F0_haiku.npz F0_params.npz

The released file is read with nfnet_jax.pretrained's restricted unpickler (nothing in
it is executed) and checked against the model before anything is written. The output
is written atomically and an existing one is kept unless --overwrite.
"""
import argparse
import sys
from typing import Optional, Sequence

from nfnet_jax import pretrained


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m nfnet_jax.convert',
      description='Convert a released NFNet checkpoint to a pickle-free .npz.')
  parser.add_argument('src', help='released F{k}_haiku.npz (or a converted .npz)')
  parser.add_argument('dst', help='output .npz')
  parser.add_argument('--variant', default=None,
                      help="variant, e.g. F0 (or ResNet50, B0 for converted files of "
                      "the other families; default: from the file)")
  parser.add_argument('--num-classes', type=int, default=1000,
                      help='classifier size to check against (default 1000)')
  parser.add_argument('--width', type=float, default=None,
                      help='width multiplier the weights were made with (default 1.0)')
  parser.add_argument('--group-size', type=int, default=None,
                      help='group width the weights were made with (default 128)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing DST')
  parser.add_argument('--no-verify-md5', dest='verify_md5', action='store_false',
                      help='skip the MD5 comparison with the (unverified) list')
  args = parser.parse_args(argv)
  model_kwargs = {k: v for k, v in (('width', args.width), ('group_size', args.group_size))
                  if v is not None}
  try:
    summary = pretrained.convert(args.src, args.dst, args.variant,
                                 overwrite=args.overwrite, num_classes=args.num_classes,
                                 verify_md5=args.verify_md5, **model_kwargs)
  except (ValueError, OSError) as e:  # PretrainedError, unknown variant, FileExistsError
    print(f'error: {e}', file=sys.stderr)
    return 1
  family = pretrained.family_of(summary['variant'])
  print(f"wrote {summary['dst']}: {family}-{summary['variant']}, {summary['arrays']} arrays, "
        f"{summary['values']:,} parameters, md5 {summary['md5']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
