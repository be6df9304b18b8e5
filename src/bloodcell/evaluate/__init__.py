"""Evaluation: metrics, calibration, OOD, statistics, plots, a run's or a folder's evaluation (the field detector's
metrics are bloodcell.detect.metrics).

Its public names are its modules, imported where they are used, not here: `import bloodcell.evaluate` stays light.
"""

__all__ = [
    "annotate",
    "calibration",
    "ensemble",
    "folder",
    "labs",
    "machine",
    "metrics",
    "ood",
    "outputs",
    "plots",
    "run",
    "stats",
]
