"""Studies: a study config expanded into runs, trained in turn or in parallel, resumable, and the report.

Its public names are its modules, imported where they are used, not here: `import bloodcell.study` stays light.
"""

__all__ = ["budget", "compare", "experiment", "labs_report", "parallel", "report", "results", "runner", "runs", "spec"]
