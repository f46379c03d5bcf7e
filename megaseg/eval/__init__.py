"""Long-context evaluation: task generators, perplexity and task evaluators, baseline
inference modes of the same weights, calibrated head selection, recall accuracy with the
retrieval hit rate. Nothing here trains: models come from pretrain/pretrain_gpt.py."""
