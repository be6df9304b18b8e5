"""Errors a user can act on. The CLI prints them as one line and exits 2."""

import re


class BloodcellError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class DataError(BloodcellError):
    """A dataset, image or split is missing, empty or unusable."""


class ConfigError(BloodcellError):
    """A config file or override names an unknown key or has a wrong value."""


class ModelError(BloodcellError):
    """A model name, weight file or checkpoint cannot be used."""


class MissingExtra(BloodcellError, ModuleNotFoundError):
    """A feature needs a package this install lacks (the light install has no PyTorch); the message names the extra.

    Also a ModuleNotFoundError, so code that already tells an absent module apart keeps working."""


class TrainingDiverged(BloodcellError):
    """The loss became NaN or infinite; the last good epoch checkpoint is kept."""


class WriteError(BloodcellError, OSError):
    """A file could not be written (disk full, read-only, no permission); nothing half-written is left."""


def shown(value, limit: int = 60, quote: bool = True) -> str:
    """A value someone sent, fit to quote in a one-line message: control characters as '?', cut to `limit`."""
    text = re.sub(r"[\x00-\x1f\x7f]", "?", str(value))
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text) if quote else text
