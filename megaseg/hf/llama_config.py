"""Compatibility name of `megaseg.hf_config`, where the HF config mapping lives.

``modeling_megaseg.py`` is copied into every exported directory; copies exported before
the move import ``model_config_from_hf`` from here. New code imports `megaseg.hf_config`.
"""
from megaseg.hf_config import *  # noqa: F401,F403
from megaseg.hf_config import __all__  # noqa: F401
