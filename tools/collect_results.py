"""Copy a study's report and small per-run artefacts (no weights, no checkpoints) into docs/results/NAME/.

.venv/bin/python tools/collect_results.py /path/to/study docs/results/paper-cpu
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

KEEP = {"config.yaml", "metrics.json", "history.csv", "status.json", "aggregate.json"}


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    # report.html is left out: it embeds the same figures again (6 MB for the paper study), and every byte of the
    # tree travels to a lent GPU with each call; report.md shows the figures kept here
    for name in ("report.md", "study.yaml", "study_status.json", "budget.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if (src / "figures").exists():
        shutil.copytree(src / "figures", dst / "figures", dirs_exist_ok=True)
    shown = (
        set(re.findall(r"\]\((runs/[^)]+\.png)\)", (src / "report.md").read_text()))
        if (src / "report.md").exists()
        else set()
    )
    for f in (src / "runs").rglob("*"):
        rel = f.relative_to(src)
        # a run's figures only where the report shows them (each run keeps its own in the study folder)
        if f.is_file() and (f.name in KEEP or rel.as_posix() in shown) and "checkpoints" not in rel.parts:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / rel)
    print(f"copied {src} -> {dst}")


if __name__ == "__main__":
    main()
