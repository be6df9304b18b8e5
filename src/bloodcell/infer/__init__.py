"""Use a trained classifier: predict, export to ONNX, explain with Grad-CAM."""

from bloodcell.infer.predictor import Predictor, collect_images, summarize

__all__ = ["Predictor", "collect_images", "summarize"]
