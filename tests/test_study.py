"""Studies: a tiny study writes both reports with every section; kill -9 and re-run skips finished runs; a failing run
is reported."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import ConfigError
from bloodcell.study.spec import expand_runs, load_study

from conftest import REPO, SAMPLE, processes_running
from test_train import BLOODCELL, cli_env

runner = CliRunner()


def tiny_study(tmp_path: Path, extra_experiments: list[dict] | None = None, seeds=(1, 2)) -> Path:
    spec = {
        "name": "tiny",
        "scale": "sample, 16-32 px, 1-2 epochs",
        "base": {"data": {"root": str(SAMPLE)}, "eval": {"bootstrap": 20, "grid_images": 4}},
        "seeds": list(seeds),
        "protocols": {
            "no_shuffle": {
                "title": "Without shuffling",
                "table": 2,
                "set": {"data.split.order": "keras"},
                "note": "The paper's order, read from its code.",
            },
            "shuffle": {"title": "With shuffling", "table": 3, "set": {"data.split.order": "keras_shuffled"}},
            "sorted": {
                "title": "Ablation: class-sorted",
                "set": {"data.split.order": "sorted", "train.epoch_shuffle": False},
            },
        },
        "compare": ["no_shuffle", "shuffle"],
        "experiments": [
            {
                "name": "cnn",
                "row": "CNN",
                "config": str(REPO / "configs/train/cnn.yaml"),
                "set": {"data.input_size": 16, "train.epochs": 2, "train.batch_size": 32},
                "protocols": ["no_shuffle", "shuffle"],
                "paper": {"no_shuffle": [97.15, 86.60], "shuffle": [95.76, 91.08]},
            },
            {
                "name": "mobilenetv2",
                "row": "MobileNet-V2",
                "config": str(REPO / "configs/train/mobilenetv2.yaml"),
                "set": {"data.input_size": 32, "train.epochs": 1, "smote.enabled": False, "augment.enabled": False},
                "protocols": ["no_shuffle", "shuffle"],
                "paper": {"no_shuffle": [89.13, 85.39], "shuffle": [90.54, 85.61]},
            },
        ]
        + (extra_experiments or []),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tiny_study_writes_both_reports_with_every_section(tmp_path):
    sorted_cnn = {
        "name": "cnn-sorted",
        "row": "CNN",
        "config": str(REPO / "configs/train/cnn.yaml"),
        "seeds": [1],
        "set": {"data.input_size": 16, "train.epochs": 1, "train.batch_size": 32},
        "protocols": ["sorted"],
    }
    cfg = tiny_study(tmp_path, [sorted_cnn])
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "runs complete: 9 of 9" in result.output and "recall %" in result.output
    md = (out / "report.md").read_text()
    sections = [
        "## The shuffling question",
        "## Dataset",
        "## Table 2: Without shuffling",
        "## Table 3: With shuffling",
        "## Ablation: class-sorted",
        "## The paper's figures",
        "## Per run",
        "## Environment",
    ]
    for section in sections:
        assert section in md, section
    assert [md.index(s) for s in sections] == sorted(md.index(s) for s in sections)  # the question comes first
    assert "The paper's order, read from its code." in md  # the protocol's note under its table
    assert "| CNN | " in md and "97.15" in md and "86.60" in md  # the paper's numbers beside ours
    assert "± " in md  # two seeds: mean ± sd
    # one plain sentence per model, with the paired CI over the 2 seeds and McNemar per seed
    for row in ("**CNN**: over 2 seeds", "**MobileNet-V2**: over 2 seeds"):
        sentence = next(line for line in md.splitlines() if line.startswith(row))
        assert "95% CI" in sentence and "McNemar p < 0.05 on" in sentence and "of 2 seeds" in sentence
        assert ("no evidence of an effect" in sentence) != ("beyond seed-to-seed noise" in sentence)
    ablation = md[md.index("## Ablation: class-sorted") : md.index("## The paper's figures")]
    assert "| CNN | " in ablation and "Test acc % under no_shuffle" in ablation
    assert "trained from scratch" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "<table>" in html
    assert "src='figures" not in html and 'src="figures' not in html  # self-contained
    for run in ("cnn/no_shuffle/seed-1", "cnn/shuffle/seed-2", "mobilenetv2/shuffle/seed-1"):
        assert json.loads((out / "runs" / run / "status.json").read_text())["state"] == "complete"
    # the two protocols share the test part for a seed, so McNemar compares the same images
    a = json.loads((out / "runs/cnn/no_shuffle/seed-1/split.json").read_text())["test"]
    b = json.loads((out / "runs/cnn/shuffle/seed-1/split.json").read_text())["test"]
    assert a == b


def _complete_runs(out: Path) -> list[Path]:
    found = []
    for status in (out / "runs").glob("*/*/seed-*/status.json"):
        try:
            if json.loads(status.read_text())["state"] == "complete":
                found.append(status.parent)
        except (ValueError, OSError):
            pass
    return found


def test_killed_study_resumes_without_redoing_finished_runs(tmp_path):
    cfg = tiny_study(tmp_path, seeds=(1,))
    out = tmp_path / "study"
    proc = subprocess.Popen(
        BLOODCELL + ["study", str(cfg), "--out", str(out)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.time()
    while len(_complete_runs(out)) < 2:
        assert proc.poll() is None, "study ended before it could be killed"
        assert time.time() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15  # worker processes notice within about a second that their parent is gone
    while (leftovers := processes_running(str(out))) and time.time() < deadline:
        time.sleep(0.05)
    assert leftovers == [], f"orphaned worker processes: {leftovers}"
    finished = _complete_runs(out)
    stamps = {d: (d / "metrics.json").stat().st_mtime_ns for d in finished}
    result = runner.invoke(app, ["study", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "runs complete: 4 of 4" in result.output
    for d, stamp in stamps.items():
        assert (d / "metrics.json").stat().st_mtime_ns == stamp, f"{d} was redone"


def test_report_only_trains_nothing(tmp_path):
    cfg = tiny_study(tmp_path, seeds=(1,))
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", str(cfg), "--out", str(out), "--report-only"])
    assert result.exit_code == 0, result.output
    assert "runs complete: 0 of 4" in result.output and not (out / "runs").exists()
    md = (out / "report.md").read_text()
    assert "CNN (not run yet)" in md and "## Environment" in md


def test_a_failing_run_is_reported_and_the_rest_go_on(tmp_path):
    broken = {
        "name": "broken",
        "row": "Broken",
        "set": {"model.name": "no-such-model", "data.input_size": 16},
        "protocols": ["shuffle"],
    }
    cfg = tiny_study(tmp_path, [broken], seeds=(1,))
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", str(cfg), "--out", str(out), "--only", "cnn", "--only", "broken"])
    assert result.exit_code == 0, result.output
    assert "runs complete: 2 of 3" in result.output and "failed: broken/shuffle/seed-1" in result.output
    status = json.loads((out / "runs/broken/shuffle/seed-1/status.json").read_text())
    assert status["state"] == "failed" and "no-such-model" in status["error"]
    md = (out / "report.md").read_text()
    assert "Broken (failed)" in md and "no-such-model" in md


def test_study_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "experiments": [{"name": "a", "protocols": ["nope"]}]}))
    with pytest.raises(ConfigError, match="unknown protocol 'nope'"):
        load_study(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "experimentz": []}))
    with pytest.raises(ConfigError, match="unknown key 'experimentz'"):
        load_study(bad)
    spec, base = load_study(tiny_study(tmp_path))
    with pytest.raises(ConfigError, match="--only: unknown experiment"):
        expand_runs(spec, base, only=["resnet"])


def test_paper_and_paper_cpu_share_protocols_and_runs():
    """paper-cpu is paper.yaml at another scale: the same protocols, experiments and seeds."""
    full, _ = load_study(REPO / "configs" / "paper.yaml")
    cpu, _ = load_study(REPO / "configs" / "paper-cpu.yaml")
    assert full.protocols == cpu.protocols and full.compare == cpu.compare
    assert [(e.name, e.row, e.protocols, e.seeds, e.paper) for e in full.experiments] == [
        (e.name, e.row, e.protocols, e.seeds, e.paper) for e in cpu.experiments
    ]


@pytest.mark.parametrize("name", ["paper.yaml", "paper-cpu.yaml", "demo.yaml", "recipe-search.yaml"])
def test_shipped_study_configs_expand(name):
    spec, base = load_study(REPO / "configs" / name)
    runs = expand_runs(spec, base, [f"data.root={SAMPLE}"])
    assert runs and all(r.config.data.root for r in runs)
    if name.startswith("paper"):
        rows = {r.experiment.row for r in runs}
        assert len(rows) == 11 + 1  # the 11 models of Tables 2-3 and Table 1's CNN with 5-fold CV
        assert {r.protocol for r in runs} == {"no_shuffle", "shuffle", "cv", "sorted"}
        assert (
            len([r for r in runs if r.protocol in ("no_shuffle", "shuffle")]) == 2 * 9 + 2 * 2 * 5
        )  # 5 seeds: CNN, MobileNet-V2
        orders = {r.protocol: r.config.data.split.order for r in runs}
        assert orders == {"no_shuffle": "keras", "shuffle": "keras_shuffled", "sorted": "sorted", "cv": "stratified"}
        assert spec.compare == ("no_shuffle", "shuffle")
    if name == "recipe-search.yaml":  # from scratch, one split, 3 seeds, EMA on: the runs of a seed can be ensembled
        assert len(runs) == 9 and {r.seed for r in runs} == {42, 43, 44}
        assert all(
            r.config.model.pretrained in (None, False) and r.config.train.ema_decay and not r.config.smote.enabled
            for r in runs
        )
        assert len({r.config.split_seed for r in runs}) == 1


def test_part_sizes_follow_the_split_smote_and_folds():
    from bloodcell.config import parse_config
    from bloodcell.study.budget import part_sizes

    counts = [100, 300, 600]  # 1,000 images
    plain = parse_config({"data": {"split": {"test_size": 0.3, "val_size": 0.2}}})
    assert part_sizes(plain, counts) == (560, 140, 300, 1)
    smote = parse_config({"smote": {"enabled": True}})
    assert part_sizes(smote, counts)[0] == round(600 * 3 * 560 / 1000)  # every class raised to the largest
    cv = parse_config({"cv": {"folds": 5}})
    assert part_sizes(cv, counts) == (560, 140, 300, 5)


def test_estimate_measures_each_setup_once_and_writes_the_budget(tmp_path, monkeypatch):
    from bloodcell.study import budget

    probes = []

    def fake_epoch_seconds(cfg, objective, images, num_classes):
        probes.append((cfg.model.name, cfg.data.input_size, objective, images))
        return 2.0 + 0.01 * images  # 2 s fixed per epoch, 10 ms per image

    monkeypatch.setattr(budget, "_epoch_seconds", fake_epoch_seconds)
    cfg = tiny_study(tmp_path)
    out = tmp_path / "est"
    result = runner.invoke(app, ["study", str(cfg), "--out", str(out), "--estimate"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not (out / "runs").exists()  # nothing trained
    # two set-ups (cnn 16 px, mobilenetv2 32 px), each probed at two sizes, once for all its seeds and protocols
    assert sorted(probes) == sorted(
        [("cnn", 16, "ce", n) for n in budget.PROBE_IMAGES]
        + [("mobilenetv2", 32, "ce", n) for n in budget.PROBE_IMAGES]
    )
    record = json.loads((out / "budget.json").read_text())
    assert [r["run"] for r in record["runs"]] == [r.key for r in expand_runs(*load_study(cfg))]
    train, val, test, _ = budget.part_sizes(expand_runs(*load_study(cfg))[0].config, budget.class_counts(SAMPLE))
    cnn = record["runs"][0]  # 2 epochs of (2 s + train x 10 ms + val x 10 ms / 3), then test and val evaluated once
    want = (
        2 * (2.0 + train * 0.01 + val * 0.01 * budget.EVAL_COST)
        + (test + val) * 0.01 * budget.EVAL_COST
        + budget.RUN_OVERHEAD_S
    )
    assert cnn["seconds"] == pytest.approx(want, abs=0.1)
    assert record["total_seconds"] == pytest.approx(sum(r["seconds"] for r in record["runs"]), abs=0.5)
    assert "total:" in result.output and "budget.json" in result.output


def test_measure_rate_times_real_training_epochs():
    from bloodcell.config import parse_config
    from bloodcell.study.budget import measure_rate

    cfg = parse_config(
        {
            "model": {"name": "cnn"},
            "data": {"input_size": 16},
            "train": {"epochs": 9, "precision": "32-true"},
            "smote": {"enabled": True},
            "cv": {"folds": 3},
        }
    )
    rate, fixed = measure_rate(cfg)
    assert 0 < rate < 1 and 0 <= fixed < 30  # seconds per image of a 16 px CNN, and per epoch
