"""Reliability: one test per bad dataset input, each asserting the exact outcome.

Outcomes are of three kinds: a file is reported (in `unreadable` / `ignored` / `warnings` with its reason) and
the rest of the data is used; the command stops with a one-line `error: ...` naming the path and exit status 2,
having written nothing; or the data is used as documented (odd image modes are converted).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import bloodcell.data.discover as discover
from bloodcell.cli import app
from bloodcell.config import load_config, parse_config, save_config
from bloodcell.data.cache import build_cache, cache_key, load_cache
from bloodcell.data.discover import scan
from bloodcell.data.images import load_array
from bloodcell.data.prepare import prepare_data
from bloodcell.data.split import SplitConfig, make_split
from bloodcell.errors import DataError

from conftest import make_tree, write_image

runner = CliRunner()
SIZE = 16  # cache size for these tests: small and fast, the faults do not depend on it
TINY_TRAIN = {"model": {"name": "cnn"}, "data": {"input_size": SIZE}, "train": {"epochs": 1, "batch_size": 8}}


# ----------------------------------------------------------------------------- helpers


def unreadable(inv) -> dict[str, str]:
    return {s.path: s.reason for s in inv.skipped}


def inspect_json(root: Path) -> dict:
    result = runner.invoke(app, ["data", "inspect", str(root), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit status 2, nothing on stdout, exactly one line `error: ...` on stderr, no traceback."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def cache_root() -> Path:
    return Path(os.environ["BLOODCELL_CACHE"])  # per test (conftest._isolated_cache)


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and build folders a failed write would leave behind."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if p.name.startswith(".build-") or p.name.endswith(".tmp")]


def train_cli(tmp_path: Path, data: Path, out: Path, *extra: str):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_TRAIN))
    return runner.invoke(app, ["train", str(cfg), "--data", str(data), "--out", str(out), *extra])


def run_config(root: Path, **data) -> object:
    return parse_config({**TINY_TRAIN, "data": {"input_size": SIZE, "root": str(root), **data}})


def _chmod_denies(path: Path) -> bool:
    """Whether this process is really refused `path` after chmod 000 (root, with CAP_DAC_OVERRIDE, is not)."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            open(path, "rb").close()
    except PermissionError:
        return True
    return False


@contextmanager
def unreadable_path(path: Path):
    """Make `path` unreadable as it is for its owner after `chmod 000`.

    The chmod is real. Where it does not stop this process (root reads through it), the one call the product
    uses to read `path` (`open` for a file, `os.scandir` for a folder) is made to raise the PermissionError the
    kernel raises for anyone else, so the product's own handling of that error is what runs. To run the real
    thing as root: `setpriv --bounding-set -dac_override,-dac_read_search python -m pytest ...`.
    """
    target = path.resolve()
    mode = path.stat().st_mode & 0o777
    path.chmod(0)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if not _chmod_denies(path) and path.is_dir():
                real_scandir = os.scandir

                def guarded_scandir(p="."):
                    if Path(p).resolve() == target:
                        raise PermissionError(13, "Permission denied", str(p))
                    return real_scandir(p)

                mp.setattr(os, "scandir", guarded_scandir)
            elif not _chmod_denies(path):

                def guarded_open(p, *a, **k):
                    if Path(p).resolve() == target:
                        raise PermissionError(13, "Permission denied", str(p))
                    return open(p, *a, **k)

                mp.setattr(discover, "open", guarded_open, raising=False)
            yield
    finally:
        path.chmod(mode)


# ----------------------------------------------------------------------------- single bad files


def test_non_image_file_named_jpg_is_unreadable(tree):
    (tree / "alpha" / "notes.jpg").write_text("these are my notes, not a picture\n")
    inv = scan(tree, progress=False)
    assert unreadable(inv) == {"alpha/notes.jpg": "not an image (unrecognised content)"}
    assert len(inv.records) == 28 and inv.files == 29
    assert inspect_json(tree)["unreadable"] == [
        {"path": "alpha/notes.jpg", "reason": "not an image (unrecognised content)"}
    ]


def test_truncated_jpeg_is_unreadable(tree):
    jpeg = tree / "beta" / "cut.jpg"
    Image.open(tree / "beta" / "beta_0000.png").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    reason = unreadable(scan(tree, progress=False))["beta/cut.jpg"]
    assert re.fullmatch(r"truncated image data \(image file is truncated \(\d+ bytes not processed\)\)", reason), reason


def test_corrupt_png_is_unreadable(tree):
    png = tree / "gamma" / "flipped.png"
    data = bytearray((tree / "gamma" / "gamma_0000.png").read_bytes())
    middle = len(data) // 2  # inside the compressed pixel data: its CRC no longer matches
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    png.write_bytes(bytes(data))
    inv = scan(tree, progress=False)
    assert unreadable(inv)["gamma/flipped.png"].startswith("cannot decode: ")
    assert "gamma/flipped.png" not in [r.relpath for r in inv.records]


def test_empty_file_is_unreadable(tree):
    (tree / "alpha" / "empty.png").write_bytes(b"")
    assert unreadable(scan(tree, progress=False)) == {"alpha/empty.png": "empty file (0 bytes)"}


def test_decompression_bomb_is_unreadable(tree):
    Image.new("L", (3000, 3000)).save(tree / "gamma" / "bomb.png")  # 9 MP decoded from a few kB
    reason = unreadable(scan(tree, progress=False, max_pixels=1_000_000))["gamma/bomb.png"]
    assert reason == "too many pixels (3000x3000 > 1,000,000); possible decompression bomb"


def test_grayscale_rgba_cmyk_16bit_images_are_converted_to_rgb(tmp_path):
    root = make_tree(tmp_path / "ds", {"a": 3, "b": 3})
    rng = np.random.default_rng(4)
    odd = {
        "a/gray.png": "L",
        "a/alpha.png": "RGBA",
        "b/print.jpg": "CMYK",
        "b/deep.png": "I;16",
    }
    for rel, mode in odd.items():
        write_image(root / rel, rng, mode=mode)
    inv = scan(root, progress=False)
    modes = {r.relpath: r.mode for r in inv.records}
    assert {rel: modes[rel] for rel in odd} == {
        "a/gray.png": "L",
        "a/alpha.png": "RGBA",
        "b/print.jpg": "CMYK",
        "b/deep.png": "I;16",
    }
    assert inv.skipped == []
    cache = build_cache(inv, SIZE, progress=False, workers=1)
    assert cache.images.dtype == np.uint8 and cache.images.shape == (10, SIZE, SIZE, 3)
    for rel in odd:
        i = cache.relpaths.index(rel)
        assert np.array_equal(cache.images[i], load_array(root / rel, SIZE, "nearest"))
        assert cache.images[i].std() > 0  # content survived the conversion


def test_tiny_images_are_used_and_visible_in_sizes(tree):
    """Decision: any image that decodes is used, however small (it is upscaled); `sizes` shows it to the user."""
    rng = np.random.default_rng(2)
    write_image(tree / "alpha" / "dot.png", rng, size=(1, 1))
    write_image(tree / "beta" / "sliver.png", rng, size=(3, 2))
    report = inspect_json(tree)
    assert report["unreadable"] == [] and report["images"] == 30
    assert report["sizes"]["1x1"] == 1 and report["sizes"]["3x2"] == 1
    inv = scan(tree, progress=False)
    cache = build_cache(inv, SIZE, progress=False, workers=1)
    dot = cache.images[cache.relpaths.index("alpha/dot.png")]
    assert dot.shape == (SIZE, SIZE, 3) and (dot == dot[0, 0]).all()  # one pixel, nearest-upscaled


def test_upper_and_mixed_case_extensions_are_images(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "ds"
    for rel in ("a/one.JPG", "a/two.Jpeg", "b/three.PNG", "b/four.TiF"):
        write_image(
            root / rel,
            rng,
            fmt={".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF"}[Path(rel).suffix.lower()],
        )
    (root / "b" / "readme.TXT").write_text("x")
    inv = scan(root, progress=False)
    assert [r.relpath for r in inv.records] == ["a/one.JPG", "a/two.Jpeg", "b/four.TiF", "b/three.PNG"]
    assert unreadable(inv) == {"b/readme.TXT": "not an image file type (.TXT)"}


def test_hidden_files_and_folders_are_reported_not_used(tree):
    (tree / "alpha" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (tree / "beta" / "._beta_0000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # macOS AppleDouble
    for hidden in (".git", "__MACOSX"):
        write_image(tree / hidden / "x.png", np.random.default_rng(0))
    inv = scan(tree, progress=False)
    assert unreadable(inv) == {
        "alpha/.DS_Store": "not an image file type (no extension)",
        "beta/._beta_0000.png": "not an image (unrecognised content)",
    }
    assert inv.class_names == ["alpha", "beta", "gamma"]
    assert [w for w in inv.warnings if "hidden" in w] == [
        ".git/: hidden folder ignored",
        "__MACOSX/: hidden folder ignored",
    ]


# ----------------------------------------------------------------------------- folders and layout


def test_empty_class_folder_is_reported_and_left_out(tree):
    (tree / "delta").mkdir()
    inv = scan(tree, progress=False)
    assert inv.class_names == ["alpha", "beta", "gamma"] and inv.empty_classes == ["delta"]
    assert "delta/: class folder has no readable images; class left out" in inv.warnings
    data = prepare_data(run_config(tree), progress=False)
    assert data.class_names == ["alpha", "beta", "gamma"] and data.source["empty_classes"] == ["delta"]


def test_class_folder_that_is_a_file_is_ignored_and_listed(tree):
    shutil.copy(tree / "alpha" / "alpha_0000.png", tree / "monocyte")  # a file where a class folder would be
    inv = scan(tree, progress=False)
    assert [(s.path, s.reason) for s in inv.ignored] == [
        ("monocyte", "file at dataset root, not inside a class folder")
    ]
    assert inv.class_names == ["alpha", "beta", "gamma"] and inv.skipped == [] and len(inv.records) == 28
    text = runner.invoke(app, ["data", "inspect", str(tree)])
    assert text.exit_code == 0 and "ignored monocyte: file at dataset root, not inside a class folder" in text.stdout
    assert prepare_data(run_config(tree), progress=False).class_names == ["alpha", "beta", "gamma"]


def test_missing_data_dir_is_one_line_error_and_writes_nothing(tmp_path):
    missing = tmp_path / "no-such-dataset"
    assert_one_line_error(runner.invoke(app, ["data", "inspect", str(missing)]), f"dataset folder not found: {missing}")
    out = tmp_path / "run"
    assert_one_line_error(train_cli(tmp_path, missing, out), f"dataset folder not found: {missing}")
    assert not out.exists()


def test_data_dir_without_class_folders_is_one_line_error(tmp_path):
    flat = tmp_path / "flat"
    write_image(flat / "a.png", np.random.default_rng(0))
    (flat / "notes.txt").write_text("x")
    expected = f"no class folders in {flat} (expected one sub-folder of images per class)"
    assert_one_line_error(runner.invoke(app, ["data", "inspect", str(flat)]), expected)
    out = tmp_path / "run"
    assert_one_line_error(train_cli(tmp_path, flat, out), expected)
    assert not out.exists()


def test_data_path_that_is_a_file_is_one_line_error(tmp_path):
    target = tmp_path / "data.zip"
    target.write_bytes(b"PK\x03\x04")
    assert_one_line_error(
        runner.invoke(app, ["data", "inspect", str(target)]), f"dataset path is not a folder or a .csv: {target}"
    )


def test_symlinks_inside_class_folders(tree, tmp_path):
    """A link to an image is that image (so a duplicate of its target); a dangling link is unreadable; a loop is not
    followed."""
    (tree / "alpha" / "again.png").symlink_to(tree / "alpha" / "alpha_0000.png")
    (tree / "beta" / "dangling.png").symlink_to(tree / "gone.png")
    (tree / "gamma" / "loop").symlink_to(tree / "gamma", target_is_directory=True)
    elsewhere = make_tree(tmp_path / "elsewhere", {"more": 2}, seed=9)
    (tree / "gamma" / "linked").symlink_to(elsewhere / "more", target_is_directory=True)
    inv = scan(tree, progress=False)
    assert unreadable(inv) == {"beta/dangling.png": "broken symbolic link or file vanished"}
    assert "gamma/loop: symbolic link loop, not followed" in inv.warnings
    relpaths = [r.relpath for r in inv.records]
    assert "gamma/linked/more_0000.png" in relpaths and len(relpaths) == 28 + 1 + 2
    assert inv.summary()["duplicate_groups"] == [["alpha/again.png", "alpha/alpha_0000.png"]]


def test_symlinks_at_dataset_root(tree, tmp_path):
    """Before: a self-referencing link at the root crashed the scan with OSError (ELOOP). Now it is listed."""
    (tree / "loop").symlink_to(tree / "loop")
    (tree / "monocyte").symlink_to(tmp_path / "not-there")
    elsewhere = make_tree(tmp_path / "elsewhere", {"delta": 3}, seed=8)
    (tree / "delta").symlink_to(elsewhere / "delta", target_is_directory=True)
    inv = scan(tree, progress=False)
    assert [(s.path, s.reason) for s in inv.ignored] == [
        ("loop", "cannot open (Too many levels of symbolic links), not used as a class folder"),
        ("monocyte", "broken symbolic link at dataset root"),
    ]
    assert inv.class_names == ["alpha", "beta", "delta", "gamma"]
    assert inspect_json(tree)["classes"]["delta"] == 3


def test_permission_denied_on_an_image(tree):
    victim = tree / "alpha" / "alpha_0001.png"
    with unreadable_path(victim):
        assert inspect_json(tree)["unreadable"] == [{"path": "alpha/alpha_0001.png", "reason": "permission denied"}]
        data = prepare_data(run_config(tree), progress=False)
        assert "alpha/alpha_0001.png" not in data.relpaths and len(data.relpaths) == 27
        assert data.source["unreadable"] == [{"path": "alpha/alpha_0001.png", "reason": "permission denied"}]
    # readable again (chmod changes ctime, so the cached "permission denied" is not reused)
    assert unreadable(scan(tree, progress=False)) == {}


def test_permission_denied_on_a_class_folder(tree):
    """Before: only a warning said the folder was skipped. Now it is listed with the unreadable files too."""
    with unreadable_path(tree / "beta"):
        report = inspect_json(tree)
        data = prepare_data(run_config(tree), progress=False)
    assert report["unreadable"] == [{"path": "beta/", "reason": "permission denied: folder and its contents skipped"}]
    assert report["empty_classes"] == ["beta"] and list(report["classes"]) == ["alpha", "gamma"]
    assert "beta/: class folder has no readable images; class left out" in report["warnings"]
    assert data.class_names == ["alpha", "gamma"] and data.source["unreadable"] == report["unreadable"]


def test_permission_denied_on_the_dataset_folder(tree):
    with unreadable_path(tree):
        result = runner.invoke(app, ["data", "inspect", str(tree)])
    assert_one_line_error(result, f"permission denied reading dataset folder: {tree}")


@pytest.mark.slow
def test_permission_faults_under_a_real_chmod(tmp_path):
    """As root, chmod 000 stops nobody, so the three tests above patch the read call. Here they run again in a
    process without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, where the kernel itself refuses the reads."""
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("not root: the permission tests above already run under a real chmod 000")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not found: cannot drop root's DAC capabilities")
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if subprocess.run([*drop, "cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("setpriv could not drop the DAC capabilities here")
    result = subprocess.run(
        [*drop, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "permission_denied", __file__],
        capture_output=True,
        text=True,
        env=dict(os.environ, BLOODCELL_PROGRESS="0"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout


# ----------------------------------------------------------------------------- duplicates


def test_same_image_twice_in_one_class_stays_on_one_side_of_every_split(tree):
    for name in ("copy1.png", "copy2.png"):
        shutil.copy(tree / "alpha" / "alpha_0000.png", tree / "alpha" / name)
    inv = scan(tree, progress=False)
    group = {"alpha/alpha_0000.png", "alpha/copy1.png", "alpha/copy2.png"}
    for seed in range(10):
        split = make_split(inv, SplitConfig(seed=seed))
        sides = {part for part in ("train", "val", "test") for i in split.part(part) if inv.records[i].relpath in group}
        assert len(sides) == 1, (seed, sides)
        assert split.dropped == []


def test_same_image_under_two_classes_is_reported_and_excluded(tree):
    shutil.copy(tree / "beta" / "beta_0001.png", tree / "gamma" / "stolen.png")
    pair = ["beta/beta_0001.png", "gamma/stolen.png"]
    assert inspect_json(tree)["conflicting_groups"] == [pair]
    text = runner.invoke(app, ["data", "inspect", str(tree)]).stdout
    assert "with conflicting labels: 1" in text and "conflict: beta/beta_0001.png == gamma/stolen.png" in text
    data = prepare_data(run_config(tree), progress=False)
    in_parts = {data.relpaths[i] for part in data.parts.values() for i in part}
    assert not in_parts & set(pair) and len(in_parts) == 29 - 2
    reason = "identical images with different labels: beta/beta_0001.png, gamma/stolen.png"
    assert data.source["dropped_by_split"] == [{"path": p, "reason": reason} for p in pair]
    # documented escape hatch: without dedup every image is kept, with the label of its folder
    kept = prepare_data(run_config(tree, split={"dedup": False}), progress=False)
    assert {kept.relpaths[i] for part in kept.parts.values() for i in part} >= set(pair)


# ----------------------------------------------------------------------------- the dataset changes


def _bmp_tree(root: Path) -> Path:
    """BMP is uncompressed: a new picture of the same dimensions has exactly the same file size."""
    return make_tree(root, {"alpha": 6, "beta": 6}, suffix=".bmp")


def _rewrite_keeping_size_and_mtime(path: Path, seed: int) -> None:
    st = path.stat()
    time.sleep(0.02)  # past one tick of the file-system clock, so ctime differs from the scan's
    fresh = path.with_name("fresh.bmp")
    with Image.open(path) as img:
        size = img.size
    write_image(fresh, np.random.default_rng(seed), size=size)
    path.write_bytes(fresh.read_bytes())  # in place: same inode
    fresh.unlink()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / rsync -t / touch -d can do
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_image_replaced_after_cache_build_with_same_size_and_mtime_is_noticed(tmp_path):
    """Before: the scan cache trusted (size, mtime), the old hash was reused and training got the old pixels."""
    root = _bmp_tree(tmp_path / "ds")
    cfg = run_config(root)
    first = prepare_data(cfg, progress=False)
    i = first.relpaths.index("beta/beta_0002.bmp")
    old = np.array(first.images[i])
    _rewrite_keeping_size_and_mtime(root / "beta" / "beta_0002.bmp", seed=77)
    second = prepare_data(cfg, progress=False)
    assert second.source["fingerprint"] != first.source["fingerprint"]
    assert second.source["cache"] != first.source["cache"]
    now = load_array(root / "beta" / "beta_0002.bmp", SIZE, "nearest")
    assert np.array_equal(second.images[i], now) and not np.array_equal(now, old)


def test_image_replaced_by_rename_after_cache_build_is_noticed(tmp_path):
    root = _bmp_tree(tmp_path / "ds")
    cfg = run_config(root)
    first = prepare_data(cfg, progress=False)
    victim = root / "alpha" / "alpha_0003.bmp"
    st = victim.stat()
    staged = root.parent / "staged.bmp"
    with Image.open(victim) as img:
        size = img.size
    write_image(staged, np.random.default_rng(55), size=size)
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(staged, victim)  # atomic replacement: new inode, old size and mtime
    second = prepare_data(cfg, progress=False)
    i = second.relpaths.index("alpha/alpha_0003.bmp")
    assert second.source["fingerprint"] != first.source["fingerprint"]
    assert np.array_equal(second.images[i], load_array(victim, SIZE, "nearest"))


def test_image_added_or_removed_after_cache_build_is_noticed(tmp_path):
    root = _bmp_tree(tmp_path / "ds")
    cfg = run_config(root)
    first = prepare_data(cfg, progress=False)
    write_image(root / "alpha" / "new.bmp", np.random.default_rng(31))
    added = prepare_data(cfg, progress=False)
    assert len(added.relpaths) == 13 and "alpha/new.bmp" in added.relpaths and added.images.shape[0] == 13
    (root / "beta" / "beta_0000.bmp").unlink()
    removed = prepare_data(cfg, progress=False)
    assert len(removed.relpaths) == 12 and "beta/beta_0000.bmp" not in removed.relpaths
    assert len({first.source["cache"], added.source["cache"], removed.source["cache"]}) == 3
    i = removed.relpaths.index("alpha/new.bmp")
    assert np.array_equal(removed.images[i], load_array(root / "alpha" / "new.bmp", SIZE, "nearest"))


def test_image_changed_between_scan_and_cache_build_is_refused(tree):
    """Before: the build cached the new pixels under the old content's key; restoring the old file then reused them."""
    inv = scan(tree, progress=False)
    victim = tree / "gamma" / "gamma_0004.png"
    original = victim.read_bytes()
    write_image(victim, np.random.default_rng(123))  # still a valid image, other content
    with pytest.raises(DataError) as err:
        build_cache(inv, SIZE, progress=False, workers=1)
    assert str(err.value) == (
        f"1 image(s) changed since the dataset was scanned, e.g. {victim.resolve()}: content differs from the scan; "
        f"run the command again to rescan the dataset"
    )
    arrays = cache_root() / "arrays"
    assert leftovers(cache_root()) == [] and not (arrays / cache_key(inv, SIZE, "nearest")).exists()
    victim.write_bytes(original)
    assert load_cache(inv, SIZE) is None
    cache = build_cache(inv, SIZE, progress=False, workers=1)
    i = cache.relpaths.index("gamma/gamma_0004.png")
    assert np.array_equal(cache.images[i], load_array(victim, SIZE, "nearest"))


def test_resumed_run_refuses_images_changed_since_its_split(tmp_path):
    """A run resumed (or re-evaluated) must see the pixels it started with; the split records content hashes."""
    root = _bmp_tree(tmp_path / "ds")
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY_TRAIN))
    cfg = load_config(cfg_file, [f"data.root={root}"])
    run = tmp_path / "run"
    data = prepare_data(cfg, split_file=run / "split.json", progress=False)
    # what run_one leaves before the first epoch: a run killed then would be resumed from here
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    data.split.save(run / "split.json")
    test_image = data.relpaths[data.parts["test"][0]]
    _rewrite_keeping_size_and_mtime(root / test_image, seed=5)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, split_file=run / "split.json", progress=False)
    message = (
        f"split file {run / 'split.json'}: 1 image(s) in {root} changed content since the split was made, "
        f"e.g. {test_image}; the run was made with the old content: start a new run in another --out folder"
    )
    assert str(err.value) == message
    result = train_cli(tmp_path, root, run, "--resume")
    assert_one_line_error(result, message)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "split.json"]  # nothing trained or written


# ----------------------------------------------------------------------------- the cache cannot be written


def test_cache_folder_not_writable_is_one_line_error(tree, tmp_path, monkeypatch):
    """Before: a traceback (NotADirectoryError). A path below a regular file fails for root too."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv("BLOODCELL_CACHE", str(blocker / "cache"))
    with pytest.raises(DataError) as err:
        prepare_data(run_config(tree), progress=False)
    assert str(err.value).startswith(
        f"cannot write the preprocessing cache in {blocker / 'cache' / 'arrays'} (Not a directory; it needs "
    )
    out = tmp_path / "run"
    assert_one_line_error(
        train_cli(tmp_path, tree, out),
        "cannot write the preprocessing cache in",
        "set BLOODCELL_CACHE to another folder",
    )
    assert not out.exists()


def test_disk_full_while_building_the_cache_is_one_line_error(tree, monkeypatch):
    """Before: the memmap was filled unreserved, so a full disk would kill the process with SIGBUS mid-build."""
    import errno

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    inv = scan(tree, progress=False)
    need = 28 * SIZE * SIZE * 3 / 1e9
    with pytest.raises(DataError) as err:
        build_cache(inv, SIZE, progress=False, workers=1)
    assert str(err.value) == (
        f"cannot write the preprocessing cache in {cache_root() / 'arrays'} "
        f"(No space left on device; it needs {need:.2f} GB): "
        f"free space there or set BLOODCELL_CACHE to another folder"
    )
    assert leftovers(cache_root()) == [] and load_cache(inv, SIZE) is None
