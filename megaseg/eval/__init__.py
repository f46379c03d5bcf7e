"""Long-context evaluation: task generators, perplexity and task evaluators, baseline
inference modes of the same weights, calibrated head selection, the alignment experiment."""
