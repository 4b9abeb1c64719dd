"""Batch-level training augmentation, after per-image preprocessing: MixUp/CutMix
(``mixing``), then RandAugment (``randaugment``, built on the batched ops of ``ops``)."""
