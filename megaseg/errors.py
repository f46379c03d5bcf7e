"""Error types shared across packages, defined below all of them.

`ConfigError` (a setting that is invalid) lives with the settings in `megaseg.config`.
"""


class CheckpointError(ValueError):
    """A checkpoint (or its config) that cannot be used; the one-line message names the file,
    says what is wrong and, where there is one, what to do instead."""
