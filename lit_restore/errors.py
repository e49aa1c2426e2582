"""The one-line errors raised about what users give. A leaf module: the config package and the
degradation ops (which the config package reads) both import it."""


class UserError(Exception):
    """A problem with what the user gave (config, data, weights, arguments), phrased as one line:
    the CLI prints it and exits 2, without a traceback unless `--debug`. Mixed into the concrete
    error types (ConfigError is a ValueError, missing shards a FileNotFoundError, ...)."""


class ConfigError(UserError, ValueError):
    """A config problem, phrased as one line that names the key path."""


class WeightsError(UserError, OSError):
    """A checkpoint or weights file that is missing or cannot be read as plain data."""
