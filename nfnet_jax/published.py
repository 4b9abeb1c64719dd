"""Published figures the tools compare with, typed once from the papers.

`PAPER_TABLE3`: the training latencies of Brock, De, Smith, Simonyan 2021 (arXiv 2102.06171),
table 3: milliseconds per full training step at 32 images per device, "data preloaded",
the median over 5000 steps (appendix A.2). TPUv3: 32 cores, bfloat16, gradients (and the
EfficientNets' batch-norm statistics) synchronised across replicas, rematerialisation where
a model did not fit in 16 GB. V100: one GPU, float16, gradient accumulation where a batch
did not fit; table 3 gives no V100 figure for the SAM rows.
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class LatencyRow:
  """One row of table 3.

  Attributes:
    label: the row as the paper prints it.
    model: the model's name in this package (`nfnet_jax.models.resolve`).
    sam: the row trains with SAM (arXiv 2102.06171 appendix A.4).
    tpuv3_ms: train ms per step on TPUv3.
    v100_ms: train ms per step on one V100; None where the table has none.
  """

  label: str
  model: str
  sam: bool
  tpuv3_ms: float
  v100_ms: Optional[float]


# fmt: off
# Keyed by the name the benchmark's paper table gives the row; table 3's row order.
PAPER_TABLE3: dict[str, LatencyRow] = {row.label.removeprefix('NFNet-'): row for row in (
  LatencyRow('NFNet-F0', 'F0', False, 73.3, 56.7),
  LatencyRow('NFNet-F1', 'F1', False, 158.5, 133.9),
  LatencyRow('NFNet-F2', 'F2', False, 295.8, 226.3),
  LatencyRow('NFNet-F3', 'F3', False, 532.2, 524.5),
  LatencyRow('NFNet-F4', 'F4', False, 1033.3, 1190.6),
  LatencyRow('NFNet-F5', 'F5', False, 1398.5, 2177.1),
  LatencyRow('NFNet-F5+SAM', 'F5', True, 1958.0, None),
  LatencyRow('NFNet-F6+SAM', 'F6', True, 2774.1, None),
  LatencyRow('EfficientNet-B0', 'EfficientNet-B0', False, 51.1, 44.8),
  LatencyRow('EfficientNet-B3', 'EfficientNet-B3', False, 129.5, 116.6),
  LatencyRow('EfficientNet-B4', 'EfficientNet-B4', False, 245.9, 221.6),
  LatencyRow('EfficientNet-B5', 'EfficientNet-B5', False, 450.5, 458.9),
  LatencyRow('EfficientNet-B6', 'EfficientNet-B6', False, 775.7, 868.2),
  LatencyRow('EfficientNet-B7', 'EfficientNet-B7', False, 1397.0, 1753.3),
)}
# Table 3's "ResNet-50" is the batch-normalised ResNet-50 baseline.
PAPER_TABLE3['BN-ResNet50'] = LatencyRow('ResNet-50', 'BN-ResNet50', False, 41.6, 35.3)
# fmt: on

# The paper's headline comparison (abstract, section 5.2): NFNet-F1 matches
# EfficientNet-B7's top-1 and trains faster; table 3's figures give the speed-ups.
HEADLINE_PAIR = ('F1', 'EfficientNet-B7')  # (fast, slow)


def headline_speedups() -> dict[str, float]:
  """B7 ms / F1 ms on each of table 3's devices: {'tpuv3': 8.8..., 'v100': 13.09...}."""
  fast, slow = (PAPER_TABLE3[name] for name in HEADLINE_PAIR)
  return {
    'tpuv3': slow.tpuv3_ms / fast.tpuv3_ms,
    'v100': slow.v100_ms / fast.v100_ms,
  }
