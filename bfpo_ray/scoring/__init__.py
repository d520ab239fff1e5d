"""Scoring: batch layouts (``layouts``), the forward that turns a batch into per-sequence log-probs (``forward``),
and ``prepare``, the Ray Data pipeline that reads, tokenizes and scores every pair once with the reference model."""
