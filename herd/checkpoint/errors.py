"""The one error type of checkpoint reading and writing."""


class CheckpointError(ValueError):
    """A checkpoint folder, file, tensor or field is missing, malformed or contradicts the config."""
