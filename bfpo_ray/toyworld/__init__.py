"""The toy world: a seeded synthetic safety/helpfulness world with an exact judge, for the default job, Figure 1 in
miniature and the tests.

    world       requests, responses of known kinds, ``materialize(cfg)`` writes the world's files and tiny model
    judge       the exact judge: ``parse_response``, ``verdict(role, response, topic)``
    tiny_model  tiny Llama models and word-level tokenizers built locally (nothing downloads)
"""
