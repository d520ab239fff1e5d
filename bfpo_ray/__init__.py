"""bfpo-ray: Bi-Factorial Preference Optimization (arXiv 2408.15313) on Ray Data, Ray Train and DeepSpeed."""

__version__ = "0.1.0"
