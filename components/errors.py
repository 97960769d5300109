"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class ContadError(Exception):
    """A problem the user can fix; the message names the file/key and what is wrong."""


class DataError(ContadError):
    """Bad or unreadable input data."""


class WeightsError(ContadError):
    """Pretrained weights missing or unreadable (message names the config key)."""


class UnreadableDataError(DataError):
    """A data folder cannot be read at all (missing permission, symlink loop)."""
