"""Training: the Lightning module, the fit loop, augmentation, SMOTE and the safetensors checkpoints.

Its public names are its modules, imported where they are used, not here: `import bloodcell.train` stays light.
"""

__all__ = ["augment", "batches", "checkpoint_io", "fit", "hardware", "module", "smote"]
