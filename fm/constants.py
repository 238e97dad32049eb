"""Constants shared by the data pipeline and the model code; importable without torch or the model layers."""

IGNORE_INDEX = -100
"""The label of a position that has no target (an input token, padding): it adds nothing to the loss."""
