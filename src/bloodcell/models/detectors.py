"""The built-in detectors register themselves here (imported on first use of the detector registry)."""

import bloodcell.models.detector_classical  # noqa: F401
import bloodcell.models.detector_fcos  # noqa: F401
