"""Hugging Face interop: Llama config/weights import, export with remote modeling code, checkpoint I/O."""
