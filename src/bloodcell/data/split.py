"""Seeded, stratified, leak-free splits: train / validation / test, and k folds for cross-validation.

Leak-free (`dedup=True`, the default): byte-identical images form one group that always lands on one side of
every split, and groups whose copies carry different labels are dropped (and reported), because no label for
them can be trusted. A CSV dataset's `group` column (patient, slide, smear) joins its images the same way, so no
patient has cells in two parts or two folds; split.json counts the groups per part.

`order` says how the training part is ordered and where validation comes from (the test part is always the same
stratified, seeded cut, so runs of one seed under different orders share their test images):
- `stratified` (default): the training part is shuffled (seeded) and validation is a stratified cut of it.
- `keras`: what the paper's code did without shuffling. scikit-learn's stratified `train_test_split` always
  shuffles (it raises for `stratify` with `shuffle=False`), so the training arrays are already in random order;
  Keras `validation_split` then takes their last `val_size` fraction, unstratified.
- `keras_shuffled`: the paper's "with shuffling": one more seeded permutation of the training arrays, then the
  same last-fraction cut.
- `sorted`: an ablation: the training part in dataset order (class, then file name) and validation its last
  fraction, so validation is mostly the last classes alphabetically.
Batches are reshuffled every epoch unless `train.epoch_shuffle` is off (Keras `fit` reshuffles by default).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from bloodcell import io
from bloodcell.data.discover import Inventory
from bloodcell.errors import DataError

SPLIT_VERSION = 1
SPLIT_ORDERS = ("stratified", "keras", "keras_shuffled", "sorted")
# split.json keeps the first 16 hex digits of each image's sha256: enough to notice changed content (a
# resumed or re-evaluated run must see the pixels it started with) at a quarter of the size of full hashes.
_HASH_DIGITS = 16


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 42
    test_size: float = 0.3
    val_size: float = 0.2
    dedup: bool = True
    order: str = "stratified"

    def __post_init__(self) -> None:
        if self.order not in SPLIT_ORDERS:
            raise DataError(f"split.order must be one of {', '.join(SPLIT_ORDERS)}, got {self.order!r}")
        for name in ("test_size", "val_size"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise DataError(f"split.{name} must be in [0, 1), got {v}")


@dataclass
class Split:
    """Indices into the inventory's records for each part. `train` is in training order."""

    config: SplitConfig
    class_names: list[str]
    relpaths: list[str]
    labels: list[int]
    train: list[int]
    val: list[int]
    test: list[int]
    dropped: list[dict] = field(default_factory=list)  # {path, reason}
    fold: int | None = None
    sha256: list[str] = field(default_factory=list)  # content hash of each record, in the order of relpaths
    groups: list[str] = field(default_factory=list)  # each record's CSV group ("" for none), in the order of relpaths

    def group_counts(self) -> dict[str, int] | None:
        """Distinct groups (patients, slides) per part, and how many of them more than one part holds (always 0)."""
        if not any(self.groups):
            return None
        seen = {p: {self.groups[i] for i in self.part(p) if self.groups[i]} for p in ("train", "val", "test")}
        shared = (seen["train"] & seen["val"]) | (seen["train"] & seen["test"]) | (seen["val"] & seen["test"])
        return {**{p: len(g) for p, g in seen.items()}, "in_more_than_one_part": len(shared)}

    def part(self, name: str) -> list[int]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def class_counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for part in ("train", "val", "test"):
            c = Counter(self.labels[i] for i in self.part(part))
            out[part] = {name: c.get(k, 0) for k, name in enumerate(self.class_names)}
        return out

    def to_dict(self) -> dict:
        names = lambda idx: [self.relpaths[i] for i in idx]  # noqa: E731
        out = {
            "version": SPLIT_VERSION,
            "config": asdict(self.config),
            "fold": self.fold,
            "class_names": self.class_names,
            "counts": self.class_counts(),
            "train": names(self.train),
            "val": names(self.val),
            "test": names(self.test),
            "dropped": self.dropped,
        }
        if self.group_counts() is not None:
            out["groups"] = self.group_counts()
        if self.sha256:
            out["sha256_16"] = {
                p: [self.sha256[i][:_HASH_DIGITS] for i in self.part(p)] for p in ("train", "val", "test")
            }
        return out

    def save(self, path: str | os.PathLike) -> None:
        io.write_json(path, self.to_dict())


def _groups(inv: Inventory, dedup: bool) -> tuple[list[list[int]], list[dict]]:
    """Groups of record indices that must stay together, and the records dropped for conflicting labels.

    Together: byte-identical images (with `dedup`) and the images of one CSV `group` (a patient, a slide), joined
    transitively, so a copy of one patient's image under another patient binds the two."""
    dropped, keep = [], list(range(len(inv.records)))
    if dedup:
        by_hash: dict[str, list[int]] = {}
        for i, r in enumerate(inv.records):
            by_hash.setdefault(r.sha256, []).append(i)
        conflicting = set()
        for members in by_hash.values():
            if len({inv.records[i].label for i in members}) > 1:
                others = ", ".join(inv.records[j].relpath for j in members)
                dropped += [
                    {"path": inv.records[i].relpath, "reason": f"identical images with different labels: {others}"}
                    for i in members
                ]
                conflicting.update(members)
        keep = [i for i in keep if i not in conflicting]
    parent = {i: i for i in keep}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i in keep:
        r = inv.records[i]
        for key in ([f"sha256:{r.sha256}"] if dedup else []) + ([f"group:{r.group}"] if r.group else []):
            j = first_with.setdefault(key, i)
            parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in keep:
        members.setdefault(find(i), []).append(i)
    groups = sorted(members.values(), key=lambda g: g[0])  # dataset order of each group's first member
    return groups, dropped


def _group_label(members: list[int], labels: list[int]) -> int:
    """The label a group is stratified by: its most common one (a patient's group holds many cell types)."""
    return Counter(labels[i] for i in members).most_common(1)[0][0] if len(members) > 1 else labels[members[0]]


def _stratified_cut(
    group_ids: list[int], group_labels: list[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split groups into (keep, cut) with ~fraction of groups per class in `cut`, seeded."""
    if fraction == 0 or not group_ids:
        return list(group_ids), []
    counts = Counter(group_labels)
    n_cut = math.ceil(fraction * len(group_ids))
    # scikit-learn's stratification needs >= 2 members per class and a cut at least one per class;
    # when that fails (tiny data), fall back to a plain seeded cut rather than refuse.
    stratify = group_labels if min(counts.values()) >= 2 and min(n_cut, len(group_ids) - n_cut) >= len(counts) else None
    keep, cut = train_test_split(group_ids, test_size=fraction, random_state=seed, stratify=stratify)
    return list(keep), list(cut)


def make_split(inv: Inventory, config: SplitConfig | None = None) -> Split:
    """Split `inv` into train / val / test as `config` says (see module docstring)."""
    config = config or SplitConfig()
    labels = inv.labels
    if len(inv.class_names) < 2:
        raise DataError(f"only one class with images in {inv.root}; a classifier needs at least two")
    groups, dropped = _groups(inv, config.dedup)
    group_labels = [_group_label(g, labels) for g in groups]
    gids = list(range(len(groups)))
    rest, test = _stratified_cut(gids, group_labels, config.test_size, config.seed)
    if config.order == "stratified":
        rng = np.random.default_rng(config.seed)
        rest = [rest[i] for i in rng.permutation(len(rest))]
        train, val = _stratified_cut(rest, [group_labels[g] for g in rest], config.val_size, config.seed + 1)
        # keep the seeded shuffled order for training
        val_set = set(val)
        train = [g for g in rest if g not in val_set]
    else:
        if config.order == "sorted":
            rest = sorted(rest)  # dataset order: class, then file name
        elif config.order == "keras_shuffled":  # `rest` is already in train_test_split's random order
            rest = [rest[i] for i in np.random.default_rng(config.seed + 2).permutation(len(rest))]
        n_val = math.floor(config.val_size * len(rest) + 0.5)  # Keras validation_split: the last fraction
        train, val = rest[: len(rest) - n_val], rest[len(rest) - n_val :]
    expand = lambda gs: [i for g in gs for i in groups[g]]  # noqa: E731
    split = Split(
        config=config,
        class_names=list(inv.class_names),
        relpaths=[r.relpath for r in inv.records],
        labels=labels,
        train=expand(train),
        val=sorted(expand(val)),
        test=sorted(expand(test)),
        dropped=dropped,
        sha256=[r.sha256 for r in inv.records],
        groups=[r.group for r in inv.records],
    )
    if not split.train:
        raise DataError(f"the split of {inv.root} leaves no training images ({len(inv.records)} images in all)")
    return split


def make_folds(inv: Inventory, split: Split, k: int = 5) -> list[Split]:
    """k stratified, group-aware folds over train + val of `split`; each fold keeps the same test part."""
    if k < 2:
        raise DataError(f"cv.folds must be at least 2, got {k}")
    pool = sorted(split.train + split.val)
    labels = np.asarray([split.labels[i] for i in pool])
    groups = _groups(inv, split.config.dedup)[0]
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    # named by the content hash of the group's first image (by position without dedup): the names the folds were
    # drawn with before CSV groups existed, so a folder dataset keeps its folds
    names = [inv.records[groups[group_of[i]][0]].sha256 if split.config.dedup else f"{group_of[i]:012d}" for i in pool]
    _, group_ids = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
    smallest = min(Counter(labels.tolist()).values())
    if smallest < k:
        raise DataError(f"cannot make {k} stratified folds: the smallest class has {smallest} training images")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=split.config.seed)
    folds = []
    rng = np.random.default_rng(split.config.seed)
    for f, (tr, va) in enumerate(cv.split(np.zeros(len(pool)), labels, group_ids)):
        train = [pool[i] for i in tr]
        if split.config.order != "sorted":
            train = [train[i] for i in rng.permutation(len(train))]
        folds.append(
            Split(
                split.config,
                split.class_names,
                split.relpaths,
                split.labels,
                train,
                sorted(pool[i] for i in va),
                list(split.test),
                split.dropped,
                fold=f,
                sha256=split.sha256,
                groups=split.groups,
            )
        )
    return folds


def load_split(path: str | os.PathLike, inv: Inventory) -> Split:
    """Rebuild a saved split against `inv`; every listed file must still be in the inventory, with the same content."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read split file {path}: {exc}") from None
    index = {r.relpath: i for i, r in enumerate(inv.records)}
    parts = {}
    for part in ("train", "val", "test"):
        missing = [p for p in data.get(part, []) if p not in index]
        if missing:
            raise DataError(
                f"split file {path}: {len(missing)} {part} image(s) no longer in {inv.root}, e.g. {missing[0]}"
            )
        parts[part] = [index[p] for p in data[part]]
    saved_hashes = data.get("sha256_16", {})  # absent in splits written before it was recorded
    changed = [
        rel
        for part in ("train", "val", "test")
        for rel, h in zip(data.get(part, []), saved_hashes.get(part, []))
        if inv.records[index[rel]].sha256[:_HASH_DIGITS] != h
    ]
    if changed:
        raise DataError(
            f"split file {path}: {len(changed)} image(s) in {inv.root} changed content since the split was made, "
            f"e.g. {changed[0]}; the run was made with the old content: start a new run in another --out folder"
        )
    if data.get("class_names") != inv.class_names:
        raise DataError(f"split file {path} has classes {data.get('class_names')}, the dataset has {inv.class_names}")
    saved_config = dict(data["config"])
    if "shuffle" in saved_config:  # splits written before `order` existed
        saved_config.setdefault("order", "stratified" if saved_config.pop("shuffle") else "sorted")
    return Split(
        config=SplitConfig(**saved_config),
        class_names=list(inv.class_names),
        relpaths=[r.relpath for r in inv.records],
        labels=inv.labels,
        dropped=data.get("dropped", []),
        fold=data.get("fold"),
        sha256=[r.sha256 for r in inv.records],
        groups=[r.group for r in inv.records],
        **parts,
    )
