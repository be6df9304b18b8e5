"""A classifier's white cells on TXL-PBC's test photographs, per source (no subtype labels there: what is found,
flagged and counted, not whether it is right). Old vs new: python benchmarks/labs_txl.py [MODEL_DIR ...]

TXL-PBC's BCCD test photographs are mostly in BCCD's own train split (sources.csv bccd_split): not held out for a
model trained on BCCD's cells.
"""

import collections
import csv
import sys
from pathlib import Path

from PIL import Image

from bloodcell.evaluate.machine import cpu_line
from bloodcell.infer import Predictor
from bloodcell.infer.fields import FieldReader

root = Path("../shared/data/txl_pbc")
rows = [r for r in csv.DictReader(open(root / "sources.csv")) if r["split"] == "test"]
print(cpu_line())
for model in sys.argv[1:] or [None]:
    label = model or "bundled"
    reader = FieldReader.load(Predictor.load(model))
    by = collections.defaultdict(lambda: collections.Counter())
    preds = collections.defaultdict(collections.Counter)
    for r in rows:
        res = reader.read(r["image"], Image.open(root / r["image"]).convert("RGB"))
        s = r["source"]
        by[s]["photos"] += 1
        by[s]["boxed_wbc"] += int(r["wbc"])
        for c in res["cells"]:
            if c["kind"] != "wbc":
                continue
            by[s]["wbc"] += 1
            by[s]["ood"] += bool(c["ood"])
            by[s]["review"] += bool(c["review"])
            by[s]["kept"] += not c["ood"] and not c["review"]
            if not c["ood"]:
                preds[s][c["label"]] += 1
    print(f"## {label}")
    print("| source | photos | boxed WBC | WBC found | OOD % | review % | kept % | counted as (not OOD) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for s, c in sorted(by.items()):
        n = max(c["wbc"], 1)
        print(
            f"| {s} | {c['photos']} | {c['boxed_wbc']} | {c['wbc']} | "
            f"{100 * c['ood'] / n:.0f} | {100 * c['review'] / n:.0f} | {100 * c['kept'] / n:.0f} | "
            + ", ".join(f"{k} {v}" for k, v in preds[s].most_common())
            + " |"
        )
