"""One root for the node's errors, split by what the caller should do next.

The edges translate these: the receiver into C-STORE statuses, the stage
runners into job state (retry later, or dead), the CLI into exit codes.
"""


class PacsNodeError(Exception):
    """Base of every error the node raises on purpose."""


class RetryableError(PacsNodeError):
    """Worth trying again later: a peer or resource is unavailable for now."""


class PermanentError(PacsNodeError):
    """Trying again cannot help: the input or the configuration is wrong."""


class ConfigurationError(PermanentError):
    """The settings, the model artifact or the environment are not usable."""


class StoreUnavailableError(RetryableError):
    """The job store (database) cannot be reached or did not commit."""


class BadInstanceError(PermanentError):
    """A received or read DICOM instance cannot be used."""


class DatasetMismatchError(BadInstanceError):
    """An instance contradicts its SOP class or its request (C-STORE 0xA900)."""


class NotFoundError(PermanentError):
    """The job, series or result asked for does not exist."""


class LeaseLostError(RetryableError):
    """The worker no longer holds the job: its lease expired and it was reaped or reclaimed."""
