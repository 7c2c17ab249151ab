"""The label convention that the loader writes and the losses read; torch-free."""

IGNORE_INDEX = -100
"""Label of positions that are not predicted (the default `ignore_index` of cross-entropy)."""
