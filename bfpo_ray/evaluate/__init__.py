"""Evaluation (DESIGN §3 "evaluate", §4 metric names): preference accuracies on held-out pairs (``metrics``),
generation for held-out prompts on Ray Data (``generation``), pluggable judges (``judges``), and the command that
ties them together for a finished model (``run``)."""
