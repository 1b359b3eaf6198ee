"""Errors that more than one task raises."""


class DatasetLayoutError(ValueError):
    """The files of a dataset do not match the expected layout; the message shows that layout and the fix."""


class TrainingDiverged(FloatingPointError):
    """A loss or a weight became NaN or inf; the message names the step and the cause. Nothing was written."""
