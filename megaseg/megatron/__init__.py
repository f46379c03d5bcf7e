"""megatron-core integration."""
