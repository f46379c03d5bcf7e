"""Data pipeline: embedded stdlib corpus, sentencepiece tokenizer, megatron-core indexed
datasets and the GPT train/valid/test datasets built from them."""
