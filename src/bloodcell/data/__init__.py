"""Data: find a dataset's images, split them, cache them as arrays, read smear-field annotations.

Its public names are its modules, imported where they are used, not here: `import bloodcell.data` stays light.
"""

__all__ = [
    "cache",
    "classes",
    "discover",
    "fields",
    "figures",
    "images",
    "labs",
    "medmnist",
    "prepare",
    "split",
    "workers",
]
