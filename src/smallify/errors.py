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
