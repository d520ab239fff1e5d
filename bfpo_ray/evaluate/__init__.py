"""Evaluation (metric names: the README's "Evaluation" section): preference accuracies on held-out pairs (``metrics``),
generation for held-out prompts on Ray Data (``generation``), pluggable judges (``judges``), and the command that
ties them together for a finished model (``run``)."""
