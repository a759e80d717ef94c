"""Scale calibration by distillation, and fidelity measurement (no store access here).

* :mod:`deltahub.calibrate.data` -- calibration / evaluation text (text, JSONL, chat messages, the
  bundled corpus) cut into fixed-length token samples;
* :mod:`deltahub.calibrate.targets` -- a teacher's next-token distributions (full or top-k + tail)
  and the KL divergence to them;
* :mod:`deltahub.calibrate.distill` -- training the ``sign1`` scales (and nothing else) of a
  delta-mode student;
* :mod:`deltahub.calibrate.evaluate` -- perplexities, KL and the share of the improvement kept,
  one model in memory at a time.

The operations that join these with the store are :mod:`deltahub.ops.calibrate` and
:mod:`deltahub.ops.evaluate`.
"""
