"""Parallelism that megaseg adds to megatron-core: context parallelism over segments."""
