"""Errors a user can act on. The CLI prints them as one line and exits 2."""


class BloodcellError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class DataError(BloodcellError):
    """A dataset, image or split is missing, empty or unusable."""


class ConfigError(BloodcellError):
    """A config file or override names an unknown key or has a wrong value."""


class ModelError(BloodcellError):
    """A model name, weight file or checkpoint cannot be used."""


class TrainingDiverged(BloodcellError):
    """The loss became NaN or infinite; the last good epoch checkpoint is kept."""


class WriteError(BloodcellError, OSError):
    """A file could not be written (disk full, read-only, no permission); nothing half-written is left."""
