"""User-facing errors: each carries a one-line message naming the file, line or key and the fix.

The CLI prints ``error: <message>`` and exits 2 for any :class:`QloraError`; nothing else is caught,
so real bugs keep their tracebacks.
"""


class QloraError(Exception):
    """A problem with the user's input (config, data, paths), explained in one line."""


class ConfigError(QloraError, ValueError):
    """An unknown config key or a bad value."""


class DataError(QloraError, ValueError):
    """A dataset problem: file, line and field named."""


class DiskFullError(QloraError, OSError):
    """A write ran out of space (or quota); ``path`` is what was being written. Whatever was there
    before the write is left as it was (writes go to a temporary and are renamed into place)."""

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(f"no space left on device writing {path}; free some space and run again "
                         f"(files written before, such as earlier checkpoints, are kept)")
