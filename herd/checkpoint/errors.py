"""The one error type of checkpoint reading and writing."""


class CheckpointError(ValueError):
    """A checkpoint folder, file, tensor or field is missing, malformed or contradicts the config."""


def check_tensors(where: str, tensors: dict, expected: dict, what: str) -> None:
    """Tensors read from ``where`` must be exactly the ``expected`` names (``what`` says whose), each of
    the expected shape; otherwise a CheckpointError naming the file and the first offenders."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{where}: not {what} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(t.shape)}, {what} need "
                                  f"{tuple(expected[k].shape)}")
