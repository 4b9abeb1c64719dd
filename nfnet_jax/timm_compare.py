r"""Our NFNet step against timm's PyTorch port of the same network, in the same process.

    python -m nfnet_jax.benchmark --compare-timm                 # F0, batch 8 at 128 px
    python -m nfnet_jax.benchmark --compare-timm --steps 9 --warmup 2

The peer is timm's `dm_nfnet_f0` (..`f6`: the port of DeepMind's released NFNets) trained
the way our config trains: forward, cross-entropy with the config's label smoothing,
backward, `timm.utils.adaptive_clip_grad` (AGC, arXiv 2102.06171 section 4.1: on every
parameter but the classifier weight) and SGD with Nesterov momentum and coupled weight decay
(not on gains, biases and skip gains), with the config's dropout and stochastic-depth rates,
and the parameter EMA (`timm.utils.ModelEmaV3`, foreach, at the config's `ema_max_decay`;
ours warms its decay up as min(max, (1 + t) / (10 + t)), which costs the same). Ours is
`benchmark`'s step: the same, plus the logged metrics. Both run on random data at the same
batch, size and float32; the two are timed in alternation (ours, timm, ours, ...) so that
the load of a shared machine hits both alike, and the medians and their ratio are printed,
with the range of the per-pair ratios. The evaluation forward (one pass, no gradient) is
compared the same way.

timm and PyTorch are not dependencies of nfnet_jax: without them the command says how
to install them. Nothing here runs in the tests but `peer_settings` and that message.
"""

import dataclasses
from importlib.util import find_spec
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnet_jax import cli, models
from nfnet_jax import config as config_lib
from nfnet_jax.models import layers

INSTALL = 'pip install torch timm'


class PeerMissing(cli.UserError):
  """PyTorch or timm is not importable."""


def _install_message(missing: str) -> str:
  return (
    f'The timm comparison needs PyTorch and timm ({missing} is not importable): `{INSTALL}` '
    '(the CPU-only PyTorch wheel: add --index-url https://download.pytorch.org/whl/cpu).'
  )


def missing_peer() -> Optional[str]:
  """The first of torch, timm that is not installed (found without importing it), or
  None."""
  for name in ('torch', 'timm'):
    try:
      found = sys.modules[name] is not None if name in sys.modules else find_spec(name)
    except (ImportError, ValueError):
      found = False
    if not found:
      return name
  return None


def import_peer():
  """(torch, timm), or `PeerMissing` naming the install command. Import them before
  TensorFlow: importing torchvision's ops after TensorFlow crashes the process."""
  try:
    import timm  # noqa: PLC0415 - optional peer, never a dependency
    import timm.utils  # noqa: PLC0415
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise PeerMissing(_install_message(getattr(e, 'name', None) or str(e))) from e
  return torch, timm


@dataclasses.dataclass(frozen=True)
class PeerSettings:
  """What the timm step is built from; every field is read from our config."""

  model_name: str
  num_classes: int
  batch_size: int
  image_size: int
  eval_image_size: int
  drop_rate: float
  drop_path_rate: float
  label_smoothing: float
  clipping: float  # AGC factor; 0: no AGC
  agc_eps: float
  learning_rate: float
  momentum: float
  nesterov: bool
  weight_decay: float
  ema_decay: Optional[float]  # None: no EMA


def timm_model_name(variant: str) -> str:
  """timm's name for the port of DeepMind's released NFNet `variant` (F0..F6)."""
  family, key = models.resolve(variant)
  if family.name != 'NFNet' or not re.fullmatch(r'F[0-6]', key):
    raise ValueError(
      f'timm ports the released NFNet-F0..F6 only (dm_nfnet_f0..f6); got {variant!r}: '
      'use --variant F0..F6.'
    )
  return f'dm_nfnet_{key.lower()}'


def peer_settings(
  config: ml_collections.ConfigDict,
  num_classes: int,
  batch_size: int,
  image_size: int,
  eval_image_size: int,
) -> PeerSettings:
  """The timm step's settings from our `config` (`config.imagenet_config(variant)` or an
  experiment's); the learning rate is the schedule's peak (its value does not change
  the cost of a step)."""
  opt, kwargs = config.optimizer, config.model.kwargs
  if opt.name != 'sgd_agc':
    raise ValueError(
      f'--compare-timm mirrors the sgd_agc recipe; this config uses {opt.name!r}: use the '
      "variant's ImageNet config (drop --config) or an sgd_agc experiment."
    )
  scale = config.train.batch_size / 256 if opt.scale_by_batch else 1.0
  return PeerSettings(
    model_name=timm_model_name(kwargs.variant),
    num_classes=num_classes,
    batch_size=batch_size,
    image_size=image_size,
    eval_image_size=eval_image_size,
    drop_rate=float(kwargs.drop_rate),
    drop_path_rate=float(kwargs.stochdepth_rate),
    label_smoothing=float(config.label_smoothing),
    clipping=float(opt.clipping or 0.0),
    agc_eps=float(opt.eps),
    learning_rate=float(opt.base_lr * scale),
    momentum=float(opt.momentum),
    nesterov=bool(opt.nesterov),
    weight_decay=float(opt.weight_decay),
    ema_decay=None if config.get('ema_max_decay') is None else float(config.ema_max_decay),
  )


# timm's NormFreeNet names: `head.fc` is the classifier; convs have `weight`, `bias` and
# `gain`, blocks a scalar `skipinit_gain`, squeeze-excite linears `weight` and `bias`.
TIMM_CLASSIFIER_WEIGHT = 'head.fc.weight'
_TIMM_NO_DECAY = ('bias', 'gain', 'skipinit_gain')


def peer_clips(name: str) -> bool:
  """Whether AGC clips timm parameter `name`: all but the classifier weight, as
  `optim.agc_mask` does for ours."""
  return name != TIMM_CLASSIFIER_WEIGHT


def peer_decays(name: str) -> bool:
  """Whether timm parameter `name` gets weight decay: weights only, as
  `optim.weight_decay_mask` does for ours."""
  return name.rsplit('.', 1)[-1] not in _TIMM_NO_DECAY


def timm_steps(
  settings: PeerSettings,
  threads: int,
  device: str = 'cpu',
  amp: str = '',
  compile_model: bool = False,
) -> tuple[Callable, Callable, str]:
  """(train_step, eval_forward, description) of the timm model, each a no-argument
  callable that runs once on a fixed random batch and waits for the result.

  `amp` ('bfloat16', 'float16' or '' for float32) runs the forward under
  `torch.autocast`; `compile_model` wraps the model in `torch.compile` (the GPU peer of
  a jitted step); on CUDA the model and batch are channels-last."""
  torch, timm = import_peer()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = timm.create_model(
    settings.model_name,
    pretrained=False,
    num_classes=settings.num_classes,
    drop_rate=settings.drop_rate,
    drop_path_rate=settings.drop_path_rate,
  ).to(device)
  memory_format = torch.channels_last if device.startswith('cuda') else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  named = list(model.named_parameters())
  groups = [
    {'params': [p for n, p in named if peer_decays(n)], 'weight_decay': settings.weight_decay},
    {'params': [p for n, p in named if not peer_decays(n)], 'weight_decay': 0.0},
  ]
  optimizer = torch.optim.SGD(
    groups, lr=settings.learning_rate, momentum=settings.momentum, nesterov=settings.nesterov
  )
  clipped = [p for n, p in named if peer_clips(n)]
  ema = (
    None
    if settings.ema_decay is None
    else timm.utils.ModelEmaV3(model, decay=settings.ema_decay, foreach=True)
  )
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
  b, s, e = settings.batch_size, settings.image_size, settings.eval_image_size
  x = torch.randn(b, 3, s, s, device=device).to(memory_format=memory_format)
  y = torch.randint(0, settings.num_classes, (b,), device=device)
  x_eval = torch.randn(b, 3, e, e, device=device).to(memory_format=memory_format)
  forward = torch.compile(model) if compile_model else model
  autocast = lambda: torch.autocast(  # noqa: E731
    device.split(':')[0], dtype=getattr(torch, amp or 'float32'), enabled=bool(amp)
  )

  def train_step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = loss_fn(forward(x).float(), y)
    loss.backward()
    if settings.clipping:
      timm.utils.adaptive_clip_grad(clipped, settings.clipping, settings.agc_eps)
    optimizer.step()
    if ema is not None:
      ema.update(model)
    return loss.item()

  def eval_forward():
    model.eval()
    with torch.inference_mode(), autocast():
      return forward(x_eval).float().sum().item()

  mode = 'torch.compile' if compile_model else 'eager'
  description = (
    f'timm {timm.__version__} {settings.model_name} (torch {torch.__version__}, {mode}, '
    f'{amp or "float32"}, {device}{"" if device != "cpu" else f", {threads} threads"})'
  )
  return train_step, eval_forward, description


def our_eval_forward(config, num_classes: int, batch_size: int, size: int, conv_impl: str):
  """A jitted single evaluation forward (no EMA pass) on a fixed random batch."""
  with layers.conv_impl(conv_impl):
    model = models.build_model(config.model, num_classes, 'float32')
    params = jax.jit(model.init, static_argnums=2)(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), False
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch_size, size, size, 3)), jnp.float32)
    start = time.perf_counter()
    forward = (
      jax.jit(lambda p, x: model.apply(p, None, x, False)['logits']).lower(params, x).compile()
    )
    compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(forward(params, x))), compile_s


def interleaved(ours: Callable, peer: Callable, steps: int, warmup: int) -> dict:
  """Runs ours, peer, ours, peer, ... (`warmup` untimed pairs, then `steps` timed
  pairs); the medians in ms, their ratio and the range of the per-pair ratios."""
  for _ in range(warmup):
    ours()
    peer()
  ours_s, peer_s = [], []
  for _ in range(steps):
    for fn, times in ((ours, ours_s), (peer, peer_s)):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  pairs = sorted(o / p for o, p in zip(ours_s, peer_s))
  ours_ms, peer_ms = statistics.median(ours_s) * 1000, statistics.median(peer_s) * 1000
  return dict(
    ours_ms=round(ours_ms, 1),
    peer_ms=round(peer_ms, 1),
    ratio=round(ours_ms / peer_ms, 3),
    ratio_min=round(pairs[0], 3),
    ratio_max=round(pairs[-1], 3),
  )


def compare(
  variant: str = 'F0',
  batch_size: int = 8,
  image_size: int = 128,
  eval_image_size: int = 192,
  steps: int = 5,
  warmup: int = 2,
  num_classes: int = 1000,
  conv_impl: str = 'auto',
  config: Optional[ml_collections.ConfigDict] = None,
  threads: int = 0,
) -> dict:
  """Both train steps and both evaluation forwards, interleaved, on one device, float32.

  `threads` 0: PyTorch gets every core this process may run on (XLA's CPU backend uses
  them all too)."""
  from nfnet_jax import benchmark  # noqa: PLC0415 - the one home of our timed step

  config = config or config_lib.imagenet_config(variant)
  settings = peer_settings(config, num_classes, batch_size, image_size, eval_image_size)
  threads = threads or len(os.sched_getaffinity(0))
  peer_train, peer_eval, peer_description = timm_steps(settings, threads)

  with layers.conv_impl(conv_impl):
    fn, advance, args, state, _, _ = benchmark._setup(  # noqa: SLF001
      variant, 'train', batch_size, image_size, 'float32', 1, num_classes, 0.0, config, None, ''
    )
    start = time.perf_counter()
    compiled = fn.lower(*args(state)).compile()
    train_compile_s = time.perf_counter() - start
    resolved = layers.resolved_conv_impl()
  holder = [state]

  def our_train():
    holder[0], out = advance(compiled, holder[0])
    jax.block_until_ready((holder[0], out))

  our_eval, eval_compile_s = our_eval_forward(
    config, num_classes, batch_size, eval_image_size, conv_impl
  )
  train = interleaved(our_train, peer_train, steps, warmup)
  evaluation = interleaved(our_eval, peer_eval, steps, warmup)
  return dict(
    variant=models.canonical_name(variant),
    settings=settings,
    conv_impl=resolved,
    train=dict(train, compile_s=round(train_compile_s, 2)),
    eval=dict(evaluation, compile_s=round(eval_compile_s, 2)),
    peer=peer_description,
    steps=steps,
    warmup=warmup,
    load=os.getloadavg(),
  )


def format_result(result: dict) -> str:
  s = result['settings']
  lines = [
    f'{result["variant"]} vs {s.model_name}, float32, {s.num_classes} classes, one device; '
    f'ours: conv {result["conv_impl"]}; peer: {result["peer"]}; median of {result["steps"]} '
    f'interleaved runs after {result["warmup"]}; load average '
    f'{", ".join(f"{v:.1f}" for v in result["load"])}',
  ]
  for key, what in (
    ('train', f'train step (batch {s.batch_size}, {s.image_size} px)'),
    ('eval', f'eval forward (batch {s.batch_size}, {s.eval_image_size} px)'),
  ):
    r = result[key]
    lines.append(
      f'{what}: nfnet_jax {r["ours_ms"]} ms (compile {r["compile_s"]} s), timm '
      f'{r["peer_ms"]} ms; ratio ours/timm {r["ratio"]:.2f} '
      f'(per pair {r["ratio_min"]:.2f}-{r["ratio_max"]:.2f})'
    )
  return '\n'.join(lines)


def compare_cli(f) -> int:
  """`benchmark --compare-timm`: the benchmark flags that were given override the
  comparison's defaults (F0, batch 8 at 128 px, eval at 192 px, 5 steps after 2).

  The benchmark has imported TensorFlow (the input pipeline's), after which importing
  torchvision crashes the process; the comparison runs in a child process that imports
  the peer first (`python -m nfnet_jax.timm_compare --compare`)."""
  missing = missing_peer()
  if missing:
    raise PeerMissing(_install_message(missing))
  if f.config is not None:
    raise ValueError("--compare-timm times the variant's ImageNet recipe: drop --config.")
  if f['dtype'].present and f.dtype != 'float32':
    raise ValueError('--compare-timm runs both in float32: drop --dtype.')

  def given(name, default):
    return f[name].value if f[name].present else default

  args = dict(
    variant=f.variant,
    batch=given('batch_per_device', 8),
    image_size=given('image_size', 128) or 128,
    eval_image_size=192,
    steps=given('steps', 5),
    warmup=given('warmup', 2),
    num_classes=f.num_classes,
    conv_impl=f.conv_impl,
  )
  command = [sys.executable, '-m', 'nfnet_jax.timm_compare', '--compare']
  command += [f'--{k}={v}' for k, v in args.items()]
  return subprocess.run(command, check=False).returncode


def peer_benchmark(
  variant: str = 'F0',
  batch_size: int = 32,
  image_size: int = 0,
  steps: int = 50,
  warmup: int = 5,
  device: str = 'cuda',
  amp: str = 'bfloat16',
  compile_model: bool = True,
  num_classes: int = 1000,
) -> dict:
  """timm's train step alone (the GPU peer of `benchmark`'s step): ms/step, img/s, the
  first step's time (compilation with `compile_model`) and the peak memory PyTorch
  allocated. `image_size` 0: the variant's train size."""
  torch, _ = import_peer()
  config = config_lib.imagenet_config(variant)
  size = image_size or config.data.image_size
  settings = peer_settings(config, num_classes, batch_size, size, config.data.eval_image_size)
  train_step, _, description = timm_steps(
    settings, len(os.sched_getaffinity(0)), device, amp, compile_model
  )
  cuda = device.startswith('cuda')
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  train_step()
  first_s = time.perf_counter() - start
  for _ in range(max(0, warmup - 1)):
    train_step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    train_step()  # .item() waits for the device
    times.append(time.perf_counter() - start)
  ms = statistics.median(times) * 1000
  return dict(
    peer=description,
    image_size=size,
    batch_size=batch_size,
    first_step_s=round(first_s, 2),
    ms_per_step=round(ms, 2),
    images_per_sec=round(batch_size / (ms / 1000), 1),
    peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else '',
  )


def main(argv=None) -> int:
  """`python -m nfnet_jax.timm_compare --device cuda --amp bfloat16 --compile`: the peer's
  train step alone, one line of figures."""

  def define(values):
    flags.DEFINE_string('variant', 'F0', 'F0..F6.', flag_values=values)
    flags.DEFINE_integer('batch', 32, 'Images per step.', flag_values=values)
    flags.DEFINE_integer('image_size', 0, "0: the variant's train size.", flag_values=values)
    flags.DEFINE_integer('steps', 50, 'Timed steps (median).', flag_values=values)
    flags.DEFINE_integer('warmup', 5, 'Untimed steps first.', flag_values=values)
    flags.DEFINE_string('device', 'cuda', 'torch device.', flag_values=values)
    flags.DEFINE_enum(
      'amp', 'bfloat16', ['', 'bfloat16', 'float16'], 'autocast dtype.', flag_values=values
    )
    flags.DEFINE_bool('compile', True, 'torch.compile the model.', flag_values=values)
    flags.DEFINE_bool(
      'compare',
      False,
      'Compare with our step on this CPU instead (what benchmark --compare-timm runs).',
      flag_values=values,
    )
    flags.DEFINE_integer('eval_image_size', 192, 'With --compare.', flag_values=values)
    flags.DEFINE_integer('num_classes', 1000, 'Classifier width.', flag_values=values)
    flags.DEFINE_enum(
      'conv_impl', 'auto', list(layers.CONV_IMPLS), 'With --compare.', flag_values=values
    )

  def work(f, positional):
    del positional
    import_peer()  # before anything imports TensorFlow
    if f.compare:
      result = compare(
        variant=f.variant,
        batch_size=f.batch,
        image_size=f.image_size or 128,
        eval_image_size=f.eval_image_size,
        steps=f.steps,
        warmup=f.warmup,
        num_classes=f.num_classes,
        conv_impl=f.conv_impl,
      )
      print(format_result(result))
      return 0
    r = peer_benchmark(
      f.variant, f.batch, f.image_size, f.steps, f.warmup, f.device, f.amp, f.compile
    )
    print(
      f'{r["peer"]}: batch {r["batch_size"]}, {r["image_size"]} px: first step (compile) '
      f'{r["first_step_s"]} s, {r["ms_per_step"]} ms/step (median of {f.steps}), '
      f'{r["images_per_sec"]} img/s, peak {r["peak_mib"]} MiB'
    )
    return 0

  return cli.run(work, define, argv, user_errors=(cli.UserError, ValueError))


if __name__ == '__main__':
  sys.exit(main())
