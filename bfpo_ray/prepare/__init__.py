"""Data preparation: raw rows -> validated, split, tokenized pairs with reference log-probs, as Parquet.

    stages       the streaming Ray Data pipeline: read, adapt + validate, select/split/order by hash, tokenize,
                 score, write
    score        the batch stage's actor: the reference model scores every pair once
    fingerprint  the hash of every input, which names (and so caches) a prepared dataset
    dataset      ``build(cfg)``: run the pipeline (or reuse its output), write the manifest

``bfpo_ray.pipeline.prepare`` is the entry point.
"""
