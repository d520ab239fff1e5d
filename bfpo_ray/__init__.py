"""bfpo-ray: Bi-Factorial Preference Optimization (arXiv 2408.15313) on Ray Data, Ray Train and DeepSpeed.

    from bfpo_ray import load_config, pipeline

    cfg = load_config("default", train={"alpha": 0.3})   # a shipped config's name or a YAML file, plus overrides
    result = pipeline.run(cfg)                           # the whole job; see bfpo_ray.pipeline for the stages

``import bfpo_ray`` loads the config module only; ``bfpo_ray.pipeline`` brings Ray, torch and transformers.
"""

from bfpo_ray.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config"]
