class BdiffError(Exception):
    """A user-facing problem (bad input, bad checkpoint, bad path): one clear line, no traceback."""
