"""Data layer: discovery and validation, bad input, the preprocessing cache, MedMNIST npz files, figures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.data.cache import build_cache, cache_key, load_cache
from bloodcell.data.discover import require_trainable, scan
from bloodcell.data.images import load_array
from bloodcell.data.medmnist import load_npz
from bloodcell.errors import DataError

from conftest import PBC, SAMPLE, make_tree, needs_pbc, write_image

runner = CliRunner()


def reasons(inv) -> dict[str, str]:
    return {s.path: s.reason for s in inv.skipped}


# ----------------------------------------------------------------------------- the real data


@needs_pbc()
def test_inspect_real_pbc_matches_its_readme(tmp_path):
    """Counts from ../shared/data/pbc/README.md: 17,092 images + the one .DS_Store named .jpg."""
    result = runner.invoke(app, ["data", "inspect", str(PBC), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["files"] == 17_093
    assert report["images"] == 17_092
    assert report["unreadable"] == [
        {"path": "neutrophil/.DS_169665.jpg", "reason": "not an image (unrecognised content)"}
    ]
    assert report["classes"] == {
        "basophil": 1218,
        "eosinophil": 3117,
        "erythroblast": 1551,
        "ig": 2895,
        "lymphocyte": 1214,
        "monocyte": 1420,
        "neutrophil": 3329,
        "platelet": 2348,
    }
    assert len(report["duplicate_groups"]) == 17
    assert report["conflicting_groups"] == [["eosinophil/EO_225902.jpg", "neutrophil/BNE_191112.jpg"]]
    listed = (PBC.parent / "pbc_exact_duplicates.txt").read_text().splitlines()
    expected = sorted(sorted(line.split()[1:]) for line in listed if line and not line.startswith("#"))
    assert sorted(sorted(g) for g in report["duplicate_groups"]) == expected


def test_embedded_sample_is_25_per_class():
    inv = scan(SAMPLE, progress=False)
    assert inv.class_names == [
        "basophil",
        "eosinophil",
        "erythroblast",
        "ig",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ]
    assert {r.label for r in inv.records} == set(inv.class_names)
    assert all(sum(r.label == c for r in inv.records) == 25 for c in inv.class_names)
    assert inv.skipped == []


# ----------------------------------------------------------------------------- discovery


def test_scan_counts_and_orders(tree):
    inv = scan(tree, progress=False)
    assert inv.class_names == ["alpha", "beta", "gamma"]
    assert len(inv.records) == 28 and inv.files == 28
    assert [r.relpath for r in inv.records] == sorted(r.relpath for r in inv.records)
    assert inv.records[0].width == 40 and inv.records[0].height == 36


def test_scan_recurses_into_nested_folders_and_reports_root_files(tree):
    write_image(tree / "alpha" / "deeper" / "more" / "x.png", np.random.default_rng(5))
    (tree / "notes.txt").write_text("hello")
    inv = scan(tree, progress=False)
    assert "alpha/deeper/more/x.png" in [r.relpath for r in inv.records]
    assert [(s.path, s.reason) for s in inv.ignored] == [
        ("notes.txt", "file at dataset root, not inside a class folder")
    ]
    assert inv.files == 30 and "notes.txt" not in reasons(inv)


def test_scan_cache_reuses_and_notices_changes(tree, monkeypatch):
    first = scan(tree, progress=False)
    calls = []
    import bloodcell.data.discover as discover

    real_probe = discover._probe
    monkeypatch.setattr(discover, "_probe", lambda a: calls.append(a[0]) or real_probe(a))
    again = scan(tree, progress=False)
    assert calls == [] and again.fingerprint() == first.fingerprint()
    victim = tree / "beta" / "beta_0003.png"
    write_image(victim, np.random.default_rng(99))
    os.utime(victim, ns=(1, 1))  # a new mtime even on coarse file systems
    changed = scan(tree, progress=False)
    assert calls == [str(victim.resolve())]
    assert changed.fingerprint() != first.fingerprint()


def test_duplicates_and_conflicts_are_grouped(tree):
    shutil.copy(tree / "alpha" / "alpha_0000.png", tree / "alpha" / "copy.png")
    shutil.copy(tree / "beta" / "beta_0001.png", tree / "gamma" / "stolen.png")
    inv = scan(tree, progress=False)
    summary = inv.summary()
    assert sorted(map(sorted, summary["duplicate_groups"])) == [
        ["alpha/alpha_0000.png", "alpha/copy.png"],
        ["beta/beta_0001.png", "gamma/stolen.png"],
    ]
    assert summary["conflicting_groups"] == [["beta/beta_0001.png", "gamma/stolen.png"]]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["missing", "file", "empty"])
def test_unusable_dataset_path_is_a_one_line_error(tmp_path, case):
    target = tmp_path / "nowhere"
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
    result = runner.invoke(app, ["data", "inspect", str(target)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]


def test_one_class_only_is_refused_for_training(tmp_path):
    root = make_tree(tmp_path / "one", {"solo": 5})
    inv = scan(root, progress=False)
    with pytest.raises(DataError, match="only one class.*solo"):
        require_trainable(inv)
    from bloodcell.data.split import make_split

    with pytest.raises(DataError, match="only one class"):
        make_split(inv)


def test_class_folder_without_images_is_reported_and_left_out(tree):
    (tree / "delta").mkdir()
    (tree / "delta" / "readme.txt").write_text("no images here")
    inv = scan(tree, progress=False)
    assert "delta" not in inv.class_names and inv.empty_classes == ["delta"]
    assert any("delta/" in w for w in inv.warnings)
    assert reasons(inv)["delta/readme.txt"].startswith("not an image file type")


def test_broken_files_are_skipped_with_reasons(tree):
    (tree / "alpha" / "empty.jpg").write_bytes(b"")
    good = tree / "alpha" / "alpha_0000.png"
    jpeg = tree / "alpha" / "cut.jpg"
    Image.open(good).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (tree / "beta" / ".DS_123.jpg").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 100)
    inv = scan(tree, progress=False)
    r = reasons(inv)
    assert r["alpha/empty.jpg"] == "empty file (0 bytes)"
    assert r["alpha/cut.jpg"].startswith("truncated image data")
    assert r["beta/.DS_123.jpg"] == "not an image (unrecognised content)"
    assert len(inv.records) == 28 and inv.files == 31


def test_decompression_bomb_is_skipped(tree):
    big = tree / "gamma" / "bomb.png"
    Image.new("L", (3000, 3000)).save(big)  # tiny on disk, 9 MP decoded
    inv = scan(tree, progress=False, max_pixels=1_000_000)
    assert "too many pixels" in reasons(inv)["gamma/bomb.png"]
    assert "possible decompression bomb" in reasons(inv)["gamma/bomb.png"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "1", "LA"])
def test_every_image_mode_becomes_8bit_rgb(tmp_path, mode):
    suffix = ".tif" if mode in ("CMYK", "I;16") else ".png"
    path = write_image(tmp_path / f"img{suffix}", np.random.default_rng(1), size=(20, 10), mode=mode)
    arr = load_array(path)
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8
    assert arr.std() > 0  # random content survives; not a flat clipped image


def test_16bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    arr = load_array(tmp_path / "x.png")
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (load_array(tmp_path / "t.png") == 255).all()


def test_unicode_and_spaces_in_names(tmp_path):
    rng = np.random.default_rng(3)
    write_image(tmp_path / "ds" / "célula blanca" / "ñandú 01.png", rng)
    write_image(tmp_path / "ds" / "红细胞" / "a b.jpg", rng)
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "ds"), "--json"])
    report = json.loads(result.stdout)
    assert report["classes"] == {"célula blanca": 1, "红细胞": 1}


def test_symlink_loops_are_not_followed(tree):
    (tree / "alpha" / "loop").symlink_to(tree / "alpha", target_is_directory=True)
    (tree / "beta" / "dangling.png").symlink_to(tree / "nowhere.png")
    inv = scan(tree, progress=False)
    assert len(inv.records) == 28
    assert any("symbolic link loop" in w for w in inv.warnings)
    assert reasons(inv)["beta/dangling.png"] == "broken symbolic link or file vanished"


def test_permission_denied_file_is_skipped(tree, monkeypatch):
    victim = tree / "alpha" / "alpha_0001.png"
    if os.geteuid() == 0:  # root reads anything: make this one file refuse, as it would for a user
        import bloodcell.data.discover as discover

        def guarded_open(path, *a, **k):
            if Path(path) == victim.resolve():
                raise PermissionError(13, "Permission denied", str(path))
            return open(path, *a, **k)

        monkeypatch.setattr(discover, "open", guarded_open, raising=False)
    else:
        victim.chmod(0)
    try:
        assert reasons(scan(tree, progress=False))["alpha/alpha_0001.png"] == "permission denied"
    finally:
        victim.chmod(0o644)


# ----------------------------------------------------------------------------- cache


def test_cache_matches_direct_decoding_and_is_reused(tree):
    inv = scan(tree, progress=False)
    cache = build_cache(inv, size=32, interpolation="nearest", progress=False)
    assert not cache.reused and cache.images.shape == (28, 32, 32, 3)
    for i in (0, 13, 27):
        assert np.array_equal(cache.images[i], load_array(inv.path(i), 32, "nearest"))
    again = build_cache(inv, size=32, interpolation="nearest", progress=False)
    assert again.reused and again.path == cache.path
    assert build_cache(inv, size=32, interpolation="bilinear", progress=False).path != cache.path


def test_parallel_and_serial_cache_builds_agree(tmp_path):
    root = make_tree(tmp_path / "big", {"a": 90, "b": 90})
    inv = scan(root, progress=False)
    serial = build_cache(inv, 24, cache_root=tmp_path / "c1", workers=1, progress=False)
    parallel = build_cache(inv, 24, cache_root=tmp_path / "c2", workers=2, progress=False)
    assert np.array_equal(np.asarray(serial.images), np.asarray(parallel.images))


def test_cache_is_rebuilt_when_a_source_changes(tree):
    inv = scan(tree, progress=False)
    old = build_cache(inv, 16, progress=False)
    write_image(tree / "gamma" / "gamma_0002.png", np.random.default_rng(7))
    inv2 = scan(tree, progress=False)
    assert load_cache(inv2, 16) is None
    new = build_cache(inv2, 16, progress=False)
    assert new.path != old.path and not new.reused


def test_interrupted_cache_build_is_never_trusted(tree, monkeypatch):
    inv = scan(tree, progress=False)
    arrays = Path(os.environ["BLOODCELL_CACHE"]) / "arrays"
    import bloodcell.data.cache as cache_mod

    def crash(*_a, **_k):
        raise RuntimeError("killed")

    original = cache_mod.io.write_json
    monkeypatch.setattr(cache_mod.io, "write_json", crash)  # dies just before the manifest
    with pytest.raises(RuntimeError, match="killed"):
        build_cache(inv, 16, progress=False, workers=1)
    monkeypatch.setattr(cache_mod.io, "write_json", original)
    assert load_cache(inv, 16) is None
    assert not (arrays / cache_key(inv, 16, "nearest")).exists()
    # kill -9 leaves its temporary folder behind, complete but for the manifest: still not trusted
    leftover = arrays / f".build-999-{cache_key(inv, 16, 'nearest')}"
    leftover.mkdir(parents=True)
    np.save(leftover / "images.npy", np.zeros((28, 16, 16, 3), np.uint8))
    assert load_cache(inv, 16) is None
    assert build_cache(inv, 16, progress=False).images.shape == (28, 16, 16, 3)


def test_cache_with_a_damaged_manifest_is_rebuilt(tree):
    inv = scan(tree, progress=False)
    cache = build_cache(inv, 16, progress=False)
    (cache.path / "manifest.json").write_text("{not json")
    assert load_cache(inv, 16) is None
    assert not build_cache(inv, 16, progress=False).reused


def test_changed_dataset_between_scan_and_cache_build_is_an_error(tree):
    inv = scan(tree, progress=False)
    (tree / "alpha" / "alpha_0004.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="changed since the dataset was scanned"):
        build_cache(inv, 16, progress=False, workers=1)


# ----------------------------------------------------------------------------- npz and figures


def _write_npz(path: Path, n=(6, 3, 4), channels=True, drop=None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for part, k in zip(("train", "val", "test"), n):
        shape = (k, 28, 28, 3) if channels else (k, 28, 28)
        arrays[f"{part}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{part}_labels"] = rng.integers(0, 8, (k, 1))
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_is_read(tmp_path):
    ds = load_npz(_write_npz(tmp_path / "bloodmnist.npz"))
    assert ds.images.shape == (13, 28, 28, 3) and ds.labels.shape == (13,)
    assert ds.class_names[3] == "ig" and list(ds.parts["val"]) == [6, 7, 8]
    gray = load_npz(_write_npz(tmp_path / "g.npz", channels=False))
    assert gray.images.shape[-1] == 3 and np.array_equal(gray.images[..., 0], gray.images[..., 2])


def test_bad_npz_names_file_and_key(tmp_path):
    with pytest.raises(DataError, match=r"b\.npz: missing key\(s\) val_labels"):
        load_npz(_write_npz(tmp_path / "b.npz", drop="val_labels"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")


def test_figures_command_writes_pngs(tmp_path):
    out = tmp_path / "figs"
    result = runner.invoke(app, ["data", "figures", str(SAMPLE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("class_distribution.png", "samples.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 300 and img.size[1] > 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_npz_at_another_size_goes_through_a_uint8_cache_resized_like_folder_images(tmp_path):
    """No float copy of the whole set: the resized images are a uint8 memmap, equal to Pillow's resize of each image
    (what folder images get), reused by the next run."""
    from PIL import Image

    from bloodcell.config import parse_config
    from bloodcell.data.images import prepare_array
    from bloodcell.data.prepare import prepare_data

    npz = _write_npz(tmp_path / "bloodmnist.npz")
    cfg = parse_config({"data": {"npz": str(npz), "input_size": 40, "interpolation": "bicubic"}})
    first = prepare_data(cfg, progress=False)
    assert (
        isinstance(first.images, np.memmap) and first.images.dtype == np.uint8 and first.images.shape == (13, 40, 40, 3)
    )
    raw = load_npz(npz).images
    want = np.stack([prepare_array(Image.fromarray(im), 40, "bicubic") for im in raw])
    np.testing.assert_array_equal(np.asarray(first.images), want)
    cached = Path(first.images.filename)
    stamp = cached.stat().st_mtime_ns
    again = prepare_data(cfg, progress=False)
    assert Path(again.images.filename) == cached and cached.stat().st_mtime_ns == stamp  # reused, not rebuilt
