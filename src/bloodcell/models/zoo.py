"""The models of the paper's Table 2, registered by name.

Minimum input sizes were found by trying: inception_v3 fails below 75 px, densenet201 below
29 px, vgg16 below 32 px. Networks with padding everywhere (resnet, mobilenet, xception) run on
even smaller images, but below their total stride of 32 the last stages see only padding, so
32 px is the minimum we accept.
"""

from __future__ import annotations

from typing import Any

from bloodcell.errors import ModelError
from bloodcell.models.cnn import SequentialCNN
from bloodcell.models.specs import register_model
from bloodcell.models.transfer import HybridClassifier, SupConModel, TimmClassifier
from bloodcell.models.unet import UNetClassifier

DENSE_256 = "GAP -> Dense 256 ReLU -> Dropout 0.5 -> Dense classes"
DENSE_1024 = "GAP -> Dense 1024 ReLU -> Dropout 0.5 -> Dense classes"


def _no_published_weights(name: str, pretrained: Any) -> None:
    if pretrained:
        raise ModelError(
            f"model '{name}' has no ImageNet backbone to load weights into: build it with "
            "pretrained=False, or use load_checkpoint() for weights you trained"
        )


@register_model("cnn", paper_row="CNN", default_input_size=128, min_input_size=16, head=DENSE_256)
def cnn(
    num_classes: int,
    input_size: int,
    pretrained: Any = False,
    head_hidden: int = 256,
    head_dropout: float = 0.5,
    norm: str = "batch",
    widths: tuple[int, ...] = (32, 64, 128, 128),
):
    """4 x [Conv3x3-BN-ReLU-MaxPool] (32/64/128/128) -> GAP -> Dense 256 -> Dropout -> classes.

    Args:
        num_classes: the number of output classes.
        input_size: the square input side in pixels.
        pretrained: must be False: there are no published weights.
        head_hidden: the head's hidden Dense width; 0: a linear head.
        head_dropout: the dropout rate before the last Dense.
        norm: "batch" (the paper's), "group" or "layer" (per-image statistics: steadier on another lab's cells).
        widths: the output channels of each conv block, input side first (one block each).
    """
    _no_published_weights("cnn", pretrained)
    return SequentialCNN(
        num_classes, input_size, widths=tuple(widths), head_hidden=head_hidden, head_dropout=head_dropout, norm=norm
    )


@register_model(
    "unet",
    paper_row="U-Net",
    default_input_size=128,
    min_input_size=16,
    input_multiple=16,
    head="decoder map -> GAP -> Dense 128 ReLU -> Dropout 0.5 -> Dense classes",
)
def unet(num_classes: int, input_size: int, pretrained: Any = False, head_hidden: int = 128, head_dropout: float = 0.5):
    """U-Net 32-64-128-256 + 512 bottleneck with skips, classifying from the decoder output.

    Args:
        num_classes: the number of output classes.
        input_size: the square input side in pixels (a multiple of 16).
        pretrained: must be False: there are no published weights.
        head_hidden: the head's hidden Dense width; 0: a linear head.
        head_dropout: the dropout rate before the last Dense.
    """
    _no_published_weights("unet", pretrained)
    return UNetClassifier(num_classes, input_size, head_hidden=head_hidden, head_dropout=head_dropout)


def _transfer(name: str, arch: str, hidden: int):
    def build(
        num_classes: int, input_size: int, pretrained: Any = False, head_hidden: int = hidden, head_dropout: float = 0.5
    ):
        return TimmClassifier(arch, num_classes, input_size, pretrained, head_hidden, head_dropout, model_name=name)

    build.__name__ = name
    build.__doc__ = f"timm {arch} -> global average pooling -> Dense {hidden} ReLU -> Dropout -> classes."
    return build


# resnet50 serves two paper rows: the same network trained with SGD and with RMSprop.
register_model("resnet50", paper_row="ResNet50-SGD, ResNet50-RMSProp", timm_backbones=("resnet50",), head=DENSE_256)(
    _transfer("resnet50", "resnet50", 256)
)
register_model("densenet201", paper_row="DenseNet-201", timm_backbones=("densenet201",), head=DENSE_256)(
    _transfer("densenet201", "densenet201", 256)
)
register_model("vgg16", paper_row="VGG-16", timm_backbones=("vgg16",), head="conv features " + DENSE_256)(
    _transfer("vgg16", "vgg16", 256)
)


@register_model(
    "supcon",
    paper_row="Supervised Contrastive Learning",
    timm_backbones=("resnetv2_50",),
    head="GAP -> Dense classes; projection GAP -> Dense 512 ReLU -> Dense 128 -> L2 norm",
)
def supcon(
    num_classes: int,
    input_size: int,
    pretrained: Any = False,
    projection_hidden: int = 512,
    projection_dim: int = 128,
    head_hidden: int = 0,
    head_dropout: float = 0.0,
):
    """ResNet50V2 encoder with a projection head for the supervised contrastive loss.

    Args:
        num_classes: the number of output classes.
        input_size: the square input side in pixels.
        pretrained: False; True for timm's ImageNet weights; or a path to a local weights file of the backbone.
        projection_hidden: the projection head's hidden width.
        projection_dim: the width of the L2-normalised projection the contrastive loss sees.
        head_hidden: the classifier head's hidden Dense width; 0: a linear head.
        head_dropout: the dropout rate before the last Dense.
    """
    return SupConModel(
        num_classes, input_size, pretrained, projection_hidden, projection_dim, head_hidden, head_dropout
    )


register_model("mobilenetv2", paper_row="MobileNet-V2", timm_backbones=("mobilenetv2_100",), head=DENSE_256)(
    _transfer("mobilenetv2", "mobilenetv2_100", 256)
)
register_model(
    "inceptionv3",
    paper_row="Inception-V3",
    default_input_size=299,
    min_input_size=75,
    timm_backbones=("inception_v3",),
    head=DENSE_1024,
)(_transfer("inceptionv3", "inception_v3", 1024))
register_model(
    "xception", paper_row="Xception", default_input_size=299, timm_backbones=("legacy_xception",), head=DENSE_1024
)(_transfer("xception", "legacy_xception", 1024))


@register_model(
    "hybrid",
    paper_row="Hybrid Model",
    default_input_size=299,
    min_input_size=75,
    timm_backbones=("inception_v3", "legacy_xception"),
    head="concat(GAP Inception-V3, GAP Xception) -> Dense 512 ReLU -> Dropout 0.5 -> Dense classes",
)
def hybrid(
    num_classes: int, input_size: int, pretrained: Any = False, head_hidden: int = 512, head_dropout: float = 0.5
):
    """Inception-V3 and Xception side by side; pretrained may name one file per backbone.

    Args:
        num_classes: the number of output classes.
        input_size: the square input side in pixels (at least 75).
        pretrained: True/False for both backbones; or one weights file each: "inception_file,xception_file", a pair,
            or {"inception": ..., "xception": ...}.
        head_hidden: the head's hidden Dense width; 0: a linear head.
        head_dropout: the dropout rate before the last Dense.
    """
    return HybridClassifier(num_classes, input_size, pretrained, head_hidden, head_dropout)
