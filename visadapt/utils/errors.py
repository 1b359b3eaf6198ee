"""Errors that more than one task raises."""


class DatasetLayoutError(ValueError):
    """The files of a dataset do not match the expected layout; the message shows that layout and the fix."""


class NotEnoughMemoryError(ValueError):
    """A run was refused before it started: the memory its configuration needs (an estimate) exceeds what is free.
    The message shows both numbers and the option that lowers the need."""


class TrainingDiverged(FloatingPointError):
    """A loss or a weight became NaN or inf; the message names the step and the cause. Nothing was written."""


class UntrustedFileError(ValueError):
    """A weights, checkpoint or dataset file was refused: not the format it claims, code in a pickle, truncated, or
    an array too large. The message names the file, the reason and the fix; nothing in the file was run."""

    def __init__(self, path, reason: str, fix: str = "") -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}" + (f". {fix}" if fix else "."))
