"""One exception hierarchy; every message names the bad value and what is accepted."""


class SmallifyError(Exception):
    """Base class of every error smallify raises on purpose."""


class ConfigError(SmallifyError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class DataError(SmallifyError, ValueError):
    """Calibration or evaluation data is missing, empty, non-finite or does not fit the model."""


class ModelError(SmallifyError, ValueError):
    """A model file is missing, corrupt, or holds something smallify cannot work on."""


class OutputError(SmallifyError, OSError):
    """An output path cannot be written."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), cut at ``limit``: what a
    one-line error quotes from a library's message."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
