"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero.

Messages name the problem and the fix, e.g. ``"output directory out/x exists: pass --overwrite or pick another"``.
"""


class CloverError(Exception):
    """A problem with the user's input or environment (not a bug in clover)."""
