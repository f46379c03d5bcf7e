"""The one error type of every checkpoint format megaseg reads or writes."""


class CheckpointError(ValueError):
    """A checkpoint (or its config) that cannot be used; the one-line message names the file,
    says what is wrong and, where there is one, what to do instead."""
