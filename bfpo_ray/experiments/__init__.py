"""Experiments that drive the whole pipeline: the paper's illustration, Figure 1 in miniature, the real-model run."""
