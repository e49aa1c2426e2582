"""The one-line errors raised about what users give. A leaf module: the config package and the
degradation ops (which the config package reads) both import it."""

import errno
import os
import shutil


class UserError(Exception):
    """A problem with what the user gave (config, data, weights, arguments), phrased as one line:
    the CLI prints it and exits 2, without a traceback unless `--debug`. Mixed into the concrete
    error types (ConfigError is a ValueError, missing shards a FileNotFoundError, ...)."""


class ConfigError(UserError, ValueError):
    """A config problem, phrased as one line that names the key path."""


class WeightsError(UserError, OSError):
    """A checkpoint or weights file that is missing or cannot be read as plain data."""


class DiskFullError(UserError, OSError):
    """No space left where a file was being written; what was there before is intact."""


# Below this much free space, a write that failed without an errno (a library's own I/O error)
# is taken for a full disk.
LOW_SPACE_BYTES = 64 << 20


def is_disk_full(error: BaseException, folder: "str | os.PathLike[str]") -> bool:
    """Whether `error`, raised while writing into `folder`, means the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False
