"""The smear-photograph field detector: a product of its own beside the classifier, as torchvision's models/detection
+ references/detection and MONAI's apps/detection are.

- base: what a detector returns (Detections), the base class (FieldDetector), the table of detectors by name
  (register_detector), keep_above and cell_scale.
- registry: create_detector, list_detectors, save_detector, load_detector, bundled_detector_dir (the built-ins are
  registered by builtins on first look-up).
- classical / classical_fit: stain thresholds, morphology and watershed, and its coordinate search.
- fcos / fcos_train / export: torchvision's FCOS, its Lightning trainer and its ONNX export.
- fcos_onnx: the FCOS export run by ONNX Runtime with numpy around it (the light install's detector).
- data: the FCOS trainer's photographs, resized once and augmented. Photographs and boxes are read by
  bloodcell.data.fields, shared with the classifier's lab sets and the review workstation.
- metrics / counting: matching, operating thresholds, AP and count errors; the count rules compared.
- runs / config: a detector run from its config (`bloodcell detector train`), and that config.

Names are imported on first use, so `import bloodcell.detect` stays light and needs no PyTorch; of these, only the
registry's and base's run in the light install.
"""

from bloodcell.extras import lazy_face

_EXPORTS = {
    "Detections": "bloodcell.detect.base",
    "FieldDetector": "bloodcell.detect.base",
    "cell_scale": "bloodcell.detect.base",
    "keep_above": "bloodcell.detect.base",
    "register_detector": "bloodcell.detect.base",
    "bundled_detector_dir": "bloodcell.detect.registry",
    "create_detector": "bloodcell.detect.registry",
    "list_detectors": "bloodcell.detect.registry",
    "load_detector": "bloodcell.detect.registry",
    "save_detector": "bloodcell.detect.registry",
    "choose_thresholds": "bloodcell.detect.metrics",
    "detection_metrics": "bloodcell.detect.metrics",
    "DetectorRunConfig": "bloodcell.detect.config",
    "evaluate_detector": "bloodcell.detect.runs",
    "fit_detector": "bloodcell.detect.runs",
    "run_detector_config": "bloodcell.detect.runs",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_face("bloodcell.detect", _EXPORTS)
