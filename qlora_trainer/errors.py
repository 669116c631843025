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
