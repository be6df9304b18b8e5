"""Model zoo: every model builds and trains, sizes are checked, weights and checkpoints load."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from bloodcell.errors import ModelError
from bloodcell.models import (
    BloodcellModel,
    create_model,
    list_models,
    load_checkpoint,
    model_info,
    save_checkpoint,
    supcon_loss,
)
from bloodcell.models.metadata import write_model_json
from bloodcell.models.registry import get_spec
from bloodcell.models.seal import seal

MODEL_NAMES = [
    "cnn", "unet", "resnet50", "densenet201", "vgg16",
    "supcon", "mobilenetv2", "inceptionv3", "xception", "hybrid",
]  # fmt: skip
TABLE2_ROWS = {
    "CNN", "U-Net", "ResNet50-SGD", "ResNet50-RMSProp", "DenseNet-201", "VGG-16",
    "Supervised Contrastive Learning", "MobileNet-V2", "Inception-V3", "Xception", "Hybrid Model",
}  # fmt: skip
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def min_batch(name: str, batch: int = 2) -> torch.Tensor:
    size = get_spec(name).min_input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def head_names(model: BloodcellModel) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(("head.", "projection."))}


# ---------------------------------------------------------------------------- registry


def test_registry_has_every_paper_model_in_table_order():
    assert list_models() == MODEL_NAMES
    rows = [row for name in MODEL_NAMES for row in model_info(name).paper_row.split(", ")]
    assert sorted(rows) == sorted(TABLE2_ROWS)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ModelError, match="unknown model 'resnet18'.*cnn, unet, resnet50"):
        create_model("resnet18")


def test_bad_arguments_are_model_errors():
    with pytest.raises(ModelError, match="num_classes"):
        create_model("cnn", num_classes=0)
    with pytest.raises(ModelError, match="'cnn' has no option 'depth'.*head_hidden"):
        create_model("cnn", depth=3)
    with pytest.raises(ModelError, match="'unet' has no ImageNet backbone"):
        create_model("unet", pretrained=True)


# ---------------------------------------------------------------------------- forward / train


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_one_training_step_at_minimum_size(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert isinstance(model, BloodcellModel) and model.model_name == name and model.num_classes == 8
    assert model.input_size == get_spec(name).default_input_size
    assert len(model.mean) == len(model.std) == 3 and model.default_cfg["input_size"][1:] == (model.input_size,) * 2
    x = min_batch(name)

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, model.num_features)
    assert logits.shape == (2, 8) and torch.isfinite(logits).all()
    assert torch.allclose(model.forward_head(features), logits)

    model.train()
    first_name, first = next(iter(model.named_parameters()))
    logits_weight = model.head[-1].weight
    before = first.detach().clone(), logits_weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 7]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(first, before[0]), f"{first_name} did not change"
    assert not torch.equal(logits_weight, before[1])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_num_classes_is_configurable(name):
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(min_batch(name, batch=1)).shape == (1, 3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_input_below_minimum_is_refused_at_build_time(name):
    minimum = get_spec(name).min_input_size
    with pytest.raises(ModelError, match=rf"model '{name}' needs input_size >= {minimum} px"):
        create_model(name, input_size=minimum - 1)


def test_known_minimums_and_unet_multiple():
    assert get_spec("inceptionv3").min_input_size == get_spec("hybrid").min_input_size == 75
    with pytest.raises(ModelError, match="'unet'.*multiple of 16"):
        create_model("unet", input_size=40)
    unet = create_model("unet", input_size=32)
    with pytest.raises(ModelError, match="multiples of 16"):
        unet(torch.zeros(1, 3, 40, 40))


# ---------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backbone_blocks_partition_everything_but_the_head(name):
    model = create_model(name, input_size=get_spec(name).min_input_size)
    blocks = model.backbone_blocks()
    flat = [n for block in blocks for n in block]
    assert len(flat) == len(set(flat)) and all(blocks)
    assert set(flat) == {n for n, _ in model.named_parameters()} - head_names(model)


def test_freeze_blocks_and_prefixes_resnet50():
    model = create_model("resnet50")
    assert model.num_blocks == 5
    frozen = model.freeze(blocks=2)  # stem + layer1
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1."))
    }
    assert set(frozen) == expected
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected

    model.train()  # frozen BatchNorm stays in eval mode, like Keras' trainable=False
    assert not model.backbone.bn1.training and not model.backbone.layer1[0].bn1.training
    assert model.backbone.layer2[0].bn1.training and model.head.training

    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters()) and model.backbone.bn1.training

    model.freeze(prefixes=["backbone.layer4", "head.0"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("backbone.layer4", "head.0"))}

    model.unfreeze()
    model.freeze()  # whole backbone, head untouched
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head_names(model)

    with pytest.raises(ModelError, match="has 5 backbone blocks"):
        model.freeze(blocks=6)
    with pytest.raises(ModelError, match="no parameter starting with 'backbone.layer9'"):
        model.freeze(prefixes=["backbone.layer9"])


def test_freeze_blocks_cnn_hybrid_and_supcon_keep_heads_trainable():
    cnn = create_model("cnn")
    cnn.freeze(blocks=2)
    assert {n for n, p in cnn.named_parameters() if not p.requires_grad} == {
        n for n, _ in cnn.named_parameters() if n.startswith(("features.0.", "features.1."))
    }

    hybrid = create_model("hybrid", input_size=75)
    hybrid.freeze(blocks=1)
    assert not hybrid.inception.Conv2d_1a_3x3.conv.weight.requires_grad
    assert not hybrid.xception.conv1.weight.requires_grad
    assert hybrid.inception.Mixed_7c.branch1x1.conv.weight.requires_grad
    assert hybrid.xception.block1.skip.weight.requires_grad

    supcon = create_model("supcon", input_size=32)
    supcon.freeze(blocks=supcon.num_blocks)
    assert {n for n, p in supcon.named_parameters() if p.requires_grad} == head_names(supcon)
    assert any(n.startswith("projection.") for n in head_names(supcon))


# ---------------------------------------------------------------------------- supcon


def test_supcon_embeddings_have_unit_norm():
    model = create_model("supcon", input_size=32).eval()
    with torch.no_grad():
        z = model.embed(min_batch("supcon", batch=3))
    assert z.shape == (3, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def _supcon_by_hand(points, labels, temperature):
    """L_out of Khosla et al., written out with plain loops over python floats."""
    unit = [[c / math.sqrt(sum(v * v for v in p)) for c in p] for p in points]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    per_anchor = []
    for i, zi in enumerate(unit):
        positives = [p for p in range(len(unit)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(dot(zi, unit[a]) / temperature) for a in range(len(unit)) if a != i)
        terms = [math.log(math.exp(dot(zi, unit[p]) / temperature) / denominator) for p in positives]
        per_anchor.append(-sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize(
    "labels,temperature",
    [([0, 0, 1, 1], 0.1), ([0, 0, 1, 1], 0.5), ([0, 0, 1, 2], 0.1), ([0, 1, 0, 0], 0.1)],
)
def test_supcon_loss_matches_hand_computation(labels, temperature):
    points = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [-0.8, 0.6]]  # the third is not unit length
    expected = _supcon_by_hand(points, labels, temperature)
    got = supcon_loss(torch.tensor(points, dtype=torch.float64), torch.tensor(labels), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_supcon_loss_trains_and_handles_a_batch_without_pairs():
    z = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    supcon_loss(z, labels).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    alone = supcon_loss(z, torch.arange(6))
    assert alone.item() == 0.0 and alone.requires_grad


# ---------------------------------------------------------------------------- pretrained weights


def test_pretrained_path_loads_timm_backbone_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("mobilenetv2_100")  # with its ImageNet classifier: ignored on load
    save_file(source.state_dict(), tmp_path / "mnv2.safetensors")
    torch.save(source.state_dict(), tmp_path / "mnv2.pth")
    reference = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    for path in (tmp_path / "mnv2.safetensors", str(tmp_path / "mnv2.pth")):
        model = create_model("mobilenetv2", pretrained=path)
        loaded = model.backbone.state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_pretrained_files_that_do_not_fit_are_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    with pytest.raises(ModelError, match="not found: .*missing.safetensors"):
        create_model("mobilenetv2", pretrained=tmp_path / "missing.safetensors")
    save_file(timm.create_model("resnet18").state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(
        ModelError, match=r"r18.safetensors does not fit the backbone of 'mobilenetv2': \d+ of \d+ tensors matched"
    ):
        create_model("mobilenetv2", pretrained=tmp_path / "r18.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="broken.safetensors is truncated"):
        create_model("mobilenetv2", pretrained=tmp_path / "broken.safetensors")


class _Payload:
    """Unpickling this would create a file: proves a .pth is never plainly unpickled."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pretrained_pickle_is_read_with_weights_only(tmp_path):
    payload = _Payload()
    payload.marker = str(tmp_path / "executed")
    torch.save({"conv_stem.weight": payload}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="evil.pth could not be read as a plain state dict"):
        create_model("mobilenetv2", pretrained=tmp_path / "evil.pth")
    assert not (tmp_path / "executed").exists()


def test_hybrid_takes_one_weights_file_per_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file

    inception = timm.create_model("inception_v3", num_classes=0)
    xception = timm.create_model("legacy_xception", num_classes=0)
    save_file(inception.state_dict(), tmp_path / "inc.safetensors")
    save_file(xception.state_dict(), tmp_path / "xcp.safetensors")
    model = create_model(
        "hybrid", input_size=75, pretrained=f"{tmp_path / 'inc.safetensors'},{tmp_path / 'xcp.safetensors'}"
    )
    assert torch.equal(model.inception.Mixed_7c.branch1x1.conv.weight, inception.Mixed_7c.branch1x1.conv.weight)
    assert torch.equal(model.xception.conv4.pointwise.weight, xception.conv4.pointwise.weight)
    with pytest.raises(ModelError, match="one weights file per backbone"):
        create_model("hybrid", input_size=75, pretrained=tmp_path / "inc.safetensors")
    with pytest.raises(ModelError, match="dict keys must be inception, xception"):
        create_model("hybrid", input_size=75, pretrained={"resnet": "x"})
    with pytest.raises(ModelError, match=r"'hybrid \(xception\)'"):  # files swapped: names the part
        create_model("hybrid", input_size=75, pretrained=(tmp_path / "inc.safetensors", tmp_path / "inc.safetensors"))


@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_pretrained_true_offline_fails_fast_with_a_hint(empty_weight_caches):
    started = time.monotonic()
    with pytest.raises(
        ModelError, match=r"could not fetch ImageNet weights for 'resnet50' \(offline\?\): pass pretrained="
    ):
        create_model("resnet50", pretrained=True)
    with pytest.raises(ModelError, match="'xception'"):  # weights published by URL, not on the Hub
        create_model("xception", pretrained=True)
    assert time.monotonic() - started < 10


def test_pretrained_true_uses_a_cached_download_offline(empty_weight_caches):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("mobilenetv2_100")
    hub_id = source.pretrained_cfg["hf_hub_id"]
    repo = empty_weight_caches / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(source.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    model = create_model("mobilenetv2", pretrained=True)
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name,options", [("cnn", {"head_hidden": 64}), ("supcon", {"projection_dim": 32})])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name, options):
    model = create_model(name, num_classes=3, input_size=32, **options).eval()
    save_checkpoint(model, tmp_path / "ckpt", {"class_names": ["a", "b", "c"], "epoch": 4})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["SEAL.json", "model.json", "model.safetensors"]
    x = min_batch(name)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors"):
        loaded, meta = load_checkpoint(path)
        assert not loaded.training and loaded.model_kwargs == options
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert meta["model_name"] == name and meta["num_classes"] == 3 and meta["input_size"] == 32
        assert meta["class_names"] == ["a", "b", "c"] and meta["epoch"] == 4
        assert meta["mean"] == list(model.mean) and meta["bloodcell_version"]
    if name == "supcon":
        with torch.no_grad():
            assert torch.equal(loaded.embed(x), model.embed(x))


@pytest.fixture
def cnn_checkpoint(tmp_path):
    model = create_model("cnn", num_classes=3, input_size=32)
    return save_checkpoint(model, tmp_path / "ckpt", {"class_names": ["a", "b", "c"]})


def _edit_json(directory: Path, **changes) -> None:
    """Edit model.json and re-seal it (as `bloodcell model seal` does): the checks behind the seal must hold too."""
    meta = json.loads((directory / "model.json").read_text())
    meta.update(changes)
    write_model_json(directory, meta)


def test_checkpoint_refuses_pickle_files(tmp_path, cnn_checkpoint):
    for suffix in (".pt", ".pth", ".ckpt", ".pkl"):
        path = tmp_path / f"model{suffix}"
        torch.save({}, path)
        with pytest.raises(ModelError, match=rf"refusing to load .*model\{suffix}: pickle"):
            load_checkpoint(path)


def test_checkpoint_refuses_truncated_weights(cnn_checkpoint):
    weights = cnn_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match="model.safetensors changed since it was sealed"):
        load_checkpoint(cnn_checkpoint)
    seal(cnn_checkpoint)  # sealed that way: the check behind the seal still refuses it
    with pytest.raises(ModelError, match="model.safetensors are truncated or corrupt"):
        load_checkpoint(cnn_checkpoint)


def test_checkpoint_refuses_json_naming_another_model(cnn_checkpoint):
    _edit_json(cnn_checkpoint, model_name="unet")
    with pytest.raises(ModelError, match="names model 'unet' but model.safetensors holds weights of 'cnn'"):
        load_checkpoint(cnn_checkpoint)


def test_checkpoint_refuses_weights_that_do_not_fit_without_header(cnn_checkpoint):
    from safetensors.torch import load_file, save_file

    weights = cnn_checkpoint / "model.safetensors"
    save_file(load_file(weights), weights)  # same tensors, no model name in the header
    seal(cnn_checkpoint)
    _edit_json(cnn_checkpoint, model_name="unet")
    with pytest.raises(ModelError, match=r"do not fit model 'unet' named in model.json: \d+ missing"):
        load_checkpoint(cnn_checkpoint)


def test_checkpoint_refuses_a_wrong_class_count(cnn_checkpoint):
    _edit_json(cnn_checkpoint, num_classes=5, class_names=None)
    with pytest.raises(ModelError, match="model.json says 5 classes but the weights have 3 outputs"):
        load_checkpoint(cnn_checkpoint)
    _edit_json(cnn_checkpoint, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ModelError, match="2 class_names but num_classes is 3"):
        load_checkpoint(cnn_checkpoint)


def test_checkpoint_save_and_load_errors(tmp_path):
    with pytest.raises(ModelError, match="2 class_names for a model with 8 classes"):
        save_checkpoint(create_model("cnn"), tmp_path / "x", {"class_names": ["a", "b"]})
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere.txt")
    with pytest.raises(ModelError, match="metadata not found"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------- CLI and docs


def test_cli_models_json_lists_every_model():
    from typer.testing import CliRunner

    from bloodcell.cli import app

    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["name"] for row in rows] == MODEL_NAMES
    for row in rows:
        assert {"name", "params", "input_size", "min_input_size", "paper_row", "pretrained_available"} <= row.keys()
        assert row["params"] == model_info(row["name"]).params > 0
        assert row["min_input_size"] <= row["input_size"]
    assert {r for row in rows for r in row["paper_row"].split(", ")} == TABLE2_ROWS
    assert {row["name"] for row in rows if not row["pretrained_available"]} == {"cnn", "unet"}

    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0 and all(name in table.output for name in MODEL_NAMES)


def _docs_table() -> dict[str, dict[str, str]]:
    lines = DOCS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name | paper row |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_documented_table_matches_the_code():
    table = _docs_table()
    assert list(table) == MODEL_NAMES
    for name, row in table.items():
        info = model_info(name)
        assert int(row["params (8 classes)"].replace(",", "")) == info.params, name
        assert row["paper row"] == info.paper_row
        assert int(row["default input"]) == info.input_size
        assert int(re.match(r"\d+", row["min input"]).group()) == info.min_input_size
        for arch in info.timm_backbones:
            assert f"`{arch}`" in row["timm backbone"]
