"""Splits: stratification, leak-freedom (duplicate groups), determinism, both order switches, folds, files."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bloodcell.data.discover import ImageRecord, Inventory
from bloodcell.data.split import SPLIT_ORDERS, SplitConfig, load_split, make_folds, make_split
from bloodcell.errors import DataError

# The real PBC class sizes, so stratification is tested at the scale it is used.
PBC_COUNTS = {
    "basophil": 1218,
    "eosinophil": 3117,
    "erythroblast": 1551,
    "ig": 2895,
    "lymphocyte": 1214,
    "monocyte": 1420,
    "neutrophil": 3329,
    "platelet": 2348,
}


def fake_inventory(counts: dict[str, int], duplicates: list[list[tuple[str, int]]] = ()) -> Inventory:
    """An inventory without image files: records with made-up hashes; `duplicates` share a hash."""
    records = []
    shared = {}
    for g, members in enumerate(duplicates):
        for member in members:
            shared[member] = f"dup{g}"
    for name, n in counts.items():
        for k in range(n):
            sha = shared.get((name, k)) or hashlib.sha256(f"{name}{k}".encode()).hexdigest()
            records.append(ImageRecord(f"{name}/{k:05d}.jpg", name, sha, 8, 8, "RGB", 10, 0))
    records.sort(key=lambda r: (r.label, r.relpath))
    return Inventory(Path("/fake"), sorted(counts), records, [], len(records))


def group_of(inv: Inventory) -> dict[int, str]:
    return {i: r.sha256 for i, r in enumerate(inv.records)}


DUPS = [
    [("basophil", 1), ("basophil", 2)],
    [("eosinophil", 5), ("eosinophil", 6), ("eosinophil", 7)],
    [("ig", 10), ("ig", 11)],
    [("eosinophil", 100), ("neutrophil", 50)],
]


@pytest.fixture(scope="module")
def pbc_like() -> Inventory:
    return fake_inventory(PBC_COUNTS, DUPS)


@pytest.mark.parametrize("order", SPLIT_ORDERS)
def test_test_part_is_stratified_within_one_percent(pbc_like, order):
    split = make_split(pbc_like, SplitConfig(seed=42, order=order))
    total = Counter(split.labels[i] for i in split.train + split.val + split.test)
    test = Counter(split.labels[i] for i in split.test)
    n_all, n_test = sum(total.values()), len(split.test)
    assert abs(n_test / n_all - 0.3) < 0.01
    for k in total:
        assert abs(test[k] / n_test - total[k] / n_all) < 0.01


def test_validation_is_stratified_when_shuffled(pbc_like):
    split = make_split(pbc_like, SplitConfig(seed=42, order="stratified"))
    pool = Counter(split.labels[i] for i in split.train + split.val)
    val = Counter(split.labels[i] for i in split.val)
    assert abs(len(split.val) / sum(pool.values()) - 0.2) < 0.01
    for k in pool:
        assert abs(val[k] / len(split.val) - pool[k] / sum(pool.values())) < 0.01


def test_unshuffled_validation_is_the_last_fifth_in_dataset_order(pbc_like):
    split = make_split(pbc_like, SplitConfig(seed=42, order="sorted"))
    assert split.train == sorted(split.train)  # dataset order: class, then file name
    assert min(split.val) > max(split.train)  # validation is the tail, as Keras validation_split takes it
    val_classes = {split.class_names[split.labels[i]] for i in split.val}
    assert val_classes <= {"neutrophil", "platelet"}  # the last classes alphabetically
    assert abs(len(split.val) / (len(split.train) + len(split.val)) - 0.2) < 0.01


def test_keras_orders_take_validation_from_the_tail_of_train_test_splits_random_order(pbc_like):
    """The paper's reading: the stratified train_test_split order, then Keras validation_split's last 20 %."""
    from sklearn.model_selection import train_test_split

    keras = make_split(pbc_like, SplitConfig(seed=42, order="keras"))
    shuffled = make_split(pbc_like, SplitConfig(seed=42, order="keras_shuffled"))
    stratified = make_split(pbc_like, SplitConfig(seed=42, order="stratified"))
    assert keras.test == shuffled.test == stratified.test  # one seed, one test part: runs compare pairwise
    pool = keras.train + keras.val
    assert sorted(pool) == sorted(shuffled.train + shuffled.val)
    assert keras.train != sorted(keras.train)  # random order, not dataset order
    n_val = len(keras.val)
    assert abs(n_val / len(pool) - 0.2) < 0.001
    # validation is exactly the tail of the training arrays in the order training sees them
    assert set(keras.val).isdisjoint(keras.train) and len(keras.train) == len(pool) - n_val
    # an unstratified tail: every class is there, in roughly its share (no class-sorted collapse)
    val_classes = Counter(keras.labels[i] for i in keras.val)
    assert len(val_classes) == len(pbc_like.class_names)
    # the two protocols differ only by one more permutation: different validation images, same class mix in train
    assert set(keras.val) != set(shuffled.val) and keras.train != shuffled.train
    # and `keras` is the order scikit-learn's own stratified split returns (groups of one image each here)
    inv = fake_inventory({"a": 30, "b": 20, "c": 10})
    ours = make_split(inv, SplitConfig(seed=3, order="keras", dedup=False))
    idx = list(range(len(inv.records)))
    sk_train, _ = train_test_split(idx, test_size=0.3, random_state=3, stratify=inv.labels)
    n_val = len(ours.val)
    assert ours.train == sk_train[: len(sk_train) - n_val] and ours.val == sorted(sk_train[len(sk_train) - n_val :])


def test_legacy_shuffle_key_maps_to_an_order(tmp_path, pbc_like):
    import json

    from bloodcell.config import parse_config

    split = make_split(pbc_like, SplitConfig(seed=5, order="sorted"))
    saved = split.to_dict()
    saved["config"].pop("order")
    saved["config"]["shuffle"] = False  # a split.json written before `order` existed
    (tmp_path / "split.json").write_text(json.dumps(saved))
    assert load_split(tmp_path / "split.json", pbc_like).config == split.config

    assert parse_config({"data": {"split": {"shuffle": False}}}).data.split.order == "sorted"
    assert parse_config({"data": {"split": {"shuffle": True}}}).data.split.order == "stratified"
    with pytest.raises(DataError, match="split.order must be one of"):
        SplitConfig(order="random")


def test_shuffled_training_order_is_not_dataset_order(pbc_like):
    split = make_split(pbc_like, SplitConfig(seed=42, order="stratified"))
    assert split.train != sorted(split.train)


@pytest.mark.parametrize("order", SPLIT_ORDERS)
def test_duplicate_groups_never_cross_parts_and_conflicts_are_dropped(pbc_like, order):
    split = make_split(pbc_like, SplitConfig(seed=7, order=order))
    groups = group_of(pbc_like)
    side = {}
    for part in ("train", "val", "test"):
        for i in split.part(part):
            assert side.setdefault(groups[i], part) == part, f"group {groups[i]} in {side[groups[i]]} and {part}"
    dropped = {d["path"] for d in split.dropped}
    assert dropped == {"eosinophil/00100.jpg", "neutrophil/00050.jpg"}
    used = split.train + split.val + split.test
    assert len(used) == len(set(used)) == len(pbc_like.records) - 2


def test_without_dedup_every_image_is_used(pbc_like):
    split = make_split(pbc_like, SplitConfig(seed=7, dedup=False))
    assert split.dropped == [] and len(split.train + split.val + split.test) == len(pbc_like.records)


def test_same_seed_same_split_other_seed_other_split(pbc_like):
    a = make_split(pbc_like, SplitConfig(seed=3))
    b = make_split(pbc_like, SplitConfig(seed=3))
    c = make_split(pbc_like, SplitConfig(seed=4))
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert set(a.test) != set(c.test)


def test_folds_partition_the_training_pool_and_keep_groups(pbc_like):
    split = make_split(pbc_like, SplitConfig(seed=1))
    folds = make_folds(pbc_like, split, k=5)
    assert len(folds) == 5
    pool = set(split.train + split.val)
    vals = [set(f.val) for f in folds]
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)
    groups = group_of(pbc_like)
    for f in folds:
        assert f.test == split.test and set(f.train) | set(f.val) == pool
        assert not {groups[i] for i in f.train} & {groups[i] for i in f.val}
        sizes = Counter(f.labels[i] for i in f.val)
        pool_sizes = Counter(split.labels[i] for i in pool)
        for k in pool_sizes:
            assert abs(sizes[k] / len(f.val) - pool_sizes[k] / len(pool)) < 0.01


def test_split_file_round_trip(pbc_like, tmp_path):
    split = make_split(pbc_like, SplitConfig(seed=5, order="sorted"))
    split.save(tmp_path / "split.json")
    again = load_split(tmp_path / "split.json", pbc_like)
    assert (again.train, again.val, again.test) == (split.train, split.val, split.test)
    assert again.config == split.config


def test_split_file_naming_missing_images_is_refused(pbc_like, tmp_path):
    split = make_split(pbc_like, SplitConfig(seed=5))
    split.save(tmp_path / "split.json")
    smaller = fake_inventory({**PBC_COUNTS, "basophil": 10}, DUPS)
    with pytest.raises(DataError, match=r"split\.json: .* no longer in"):
        load_split(tmp_path / "split.json", smaller)


def test_bad_fractions_and_folds_are_clear_errors(pbc_like):
    with pytest.raises(DataError, match="split.test_size"):
        SplitConfig(test_size=1.5)
    tiny = fake_inventory({"a": 3, "b": 3})
    with pytest.raises(DataError, match="cannot make 5 stratified folds"):
        make_folds(tiny, make_split(tiny, SplitConfig(test_size=0.0)), k=5)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=2, max_value=60), min_size=2, max_size=6),
    seed=st.integers(0, 10_000),
    order=st.sampled_from(SPLIT_ORDERS),
    test_size=st.sampled_from([0.0, 0.2, 0.3, 0.5]),
)
def test_any_split_is_a_partition(counts, seed, order, test_size):
    inv = fake_inventory({f"c{k}": n for k, n in enumerate(counts)})
    split = make_split(inv, SplitConfig(seed=seed, order=order, test_size=test_size))
    used = split.train + split.val + split.test
    assert sorted(used) == list(range(len(inv.records)))
