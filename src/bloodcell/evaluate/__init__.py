"""Evaluation: metrics, calibration, OOD, statistics, plots, a run's or a folder's evaluation, detection and counting.

Its public names are its modules, imported where they are used, not here: `import bloodcell.evaluate` stays light.
"""

__all__ = [
    "annotate", "calibration", "counting", "detect", "ensemble", "folder", "labs", "machine", "metrics", "ood",
    "outputs", "plots", "run", "stats"
]
