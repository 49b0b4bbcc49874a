"""User-facing errors. Hydra prints a CompactHydraException's message without a traceback
(the full trace stays available with HYDRA_FULL_ERROR=1)."""

from hydra.errors import CompactHydraException


class MoeExpError(CompactHydraException):
    """A run could not proceed for a reason the user should read, not a bug."""


class ConfigError(MoeExpError):
    """The composed config breaks a rule; raised before anything heavy runs."""


class DivergedError(MoeExpError):
    """The training loss became NaN or infinite."""


class DataNotFoundError(MoeExpError):
    """A dataset's files are missing (or fail their checksum) under ``data.root``."""
