"""Hugging Face interop: Llama import and export with remote modeling code (the config.json
mapping itself is `megaseg.hf_config`, below this package and `megaseg.checkpoint`)."""
