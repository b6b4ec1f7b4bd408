"""Bundled datasets: shapes, classes, sites, published normalisation, determinism and splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.datasets import (
    DATASET_NAMES,
    Dataset,
    DatasetSchema,
    FeatureSpec,
    load_dataset,
    load_table,
    normalise_frame,
    split_holdout,
    split_train_test,
)
from fedgov.errors import ConfigError, DataValidationError

# name: (x shape, class count, number of natural sites, class labels)
EXPECTED = {
    "randhie": ((20186, 16), 2, 6, ("no-expense", "expense")),
    "medpar": ((1495, 6), 2, 54, ("survived", "died")),
    "loans": ((9182, 16), 4, 50, ("A", "B", "C", "D-G")),
    "digits": ((1797, 1, 8, 8), 10, 0, tuple("0123456789")),
    "mnist5k": ((5000, 1, 28, 28), 10, 0, tuple("0123456789")),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_shapes_classes_and_sites(name: str) -> None:
    shape, num_classes, num_sites, classes = EXPECTED[name]
    ds = load_dataset(name)
    assert ds.x.shape == shape
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.schema.input_shape == shape[1:]
    assert ds.schema.classes == classes
    assert set(np.unique(ds.y)) == set(range(num_classes))
    assert np.all(np.isfinite(ds.x))
    if num_sites:
        assert len(np.unique(ds.site)) == num_sites
        assert ds.schema.site_column is not None
        assert len(ds.schema.features) == shape[1]
    else:
        assert set(ds.site.tolist()) == {""}
        assert ds.schema.site_column is None and ds.schema.features == ()


def test_natural_site_labels() -> None:
    assert sorted(set(load_dataset("randhie").site)) == [f"site-{i}" for i in range(1, 7)]
    medpar_sites = set(load_dataset("medpar").site)
    assert "hosp-30001" in medpar_sites and all(s.startswith("hosp-") for s in medpar_sites)
    assert {"CA", "TX", "NY"} <= set(load_dataset("loans").site)


def test_class_counts() -> None:
    assert np.bincount(load_dataset("medpar").y).tolist() == [982, 513]
    assert np.bincount(load_dataset("mnist5k").y).tolist() == [500] * 10
    # grades E, F and G (335 + 58 + 12 loans before dropping rows) are folded into D-G
    loans = load_table("loans")
    assert set(loans["grade"]) == {"A", "B", "C", "D-G"}


def test_no_leaky_features() -> None:
    randhie = load_dataset("randhie").schema.feature_names
    assert not [f for f in randhie if f.endswith("dol") or "vis" in f or f == "binexp"]
    loans = load_dataset("loans").schema.feature_names
    leaky = {"interest_rate", "sub_grade", "installment", "balance", "grade"}
    assert not leaky & set(loans) and not [f for f in loans if f.startswith("paid_")]
    assert len(randhie) == 16 and len(loans) == 16


@pytest.mark.parametrize("name", ["randhie", "medpar", "loans", "synthetic"])
def test_published_constants_normalise_the_whole_table(name: str) -> None:
    ds = load_dataset(name)
    np.testing.assert_allclose(ds.x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(ds.x.std(axis=0), 1.0, atol=1e-4)
    table = load_table(name)
    for spec in ds.schema.features:
        if spec.dtype == "int":
            values = table[spec.name].to_numpy(dtype=float)
            assert np.array_equal(values, np.round(values)), spec.name


def test_log1p_then_standardise() -> None:
    ds = load_dataset("medpar")
    los = ds.schema.features[0]
    assert los.name == "los" and los.log1p
    raw = load_table("medpar")["los"].to_numpy(dtype=float)
    expected = (np.log1p(raw) - np.log1p(raw).mean()) / np.log1p(raw).std()
    np.testing.assert_allclose(ds.x[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_image_normalisation() -> None:
    mnist = load_dataset("mnist5k")
    # a background pixel (0) maps to -mean/std of the published MNIST constants
    assert mnist.x.min() == pytest.approx(-0.1307 / 0.3081, rel=1e-6)
    assert mnist.x.max() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)
    digits = load_dataset("digits")
    assert abs(float(digits.x.mean())) < 1e-3 and abs(float(digits.x.std()) - 1) < 1e-3


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_deterministic_and_not_shared(name: str) -> None:
    first, second = load_dataset(name, seed=3), load_dataset(name, seed=3)
    assert np.array_equal(first.x, second.x) and np.array_equal(first.y, second.y)
    assert np.array_equal(first.site, second.site)
    first.x[:] = 0  # a caller's changes never leak into the cache
    assert not np.array_equal(load_dataset(name, seed=3).x, first.x)


def test_synthetic_sites_sizes_and_seed() -> None:
    ds = load_dataset("synthetic", seed=0, num_sites=12)
    names, sizes = np.unique(ds.site, return_counts=True)
    assert names.tolist() == [f"site-{i:02d}" for i in range(12)]
    assert sizes.min() >= 100 and len(set(sizes.tolist())) > 1  # heterogeneous sizes
    assert len(np.unique(load_dataset("synthetic", num_sites=0).site)) == 10
    assert load_dataset("synthetic", num_sites=101).site[-1] == "site-100"
    other = load_dataset("synthetic", seed=1, num_sites=12)
    assert other.x.shape != ds.x.shape or not np.array_equal(other.x, ds.x)


def test_synthetic_sites_are_shifted_but_learnable() -> None:
    from sklearn.linear_model import LogisticRegression

    ds = load_dataset("synthetic", seed=0)
    # covariate shift: site means of a feature spread far more than sampling noise would
    site_means = [ds.x[ds.site == s, 0].mean() for s in np.unique(ds.site)]
    assert np.std(site_means) > 0.3
    pool, holdout = split_holdout(ds, 0.3, seed=0)
    model = LogisticRegression(max_iter=500).fit(pool.x, pool.y)
    majority = np.bincount(holdout.y).max() / len(holdout)
    assert model.score(holdout.x, holdout.y) > majority + 0.2


def test_unknown_dataset_suggests() -> None:
    with pytest.raises(ConfigError, match=r"dataset.name: 'medapr'.*did you mean 'medpar'"):
        load_dataset("medapr")
    with pytest.raises(ConfigError, match=r"image dataset"):
        load_table("digits")


def test_schema_round_trips_through_json_and_yaml() -> None:
    for name in ("loans", "digits"):
        schema = load_dataset(name).schema
        assert DatasetSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema
        assert DatasetSchema.from_dict(yaml.safe_load(yaml.safe_dump(schema.to_dict()))) == schema


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(clases=d.pop("classes")), r"unknown key 'clases'.*did you mean"),
        (lambda d: d.pop("target"), r"key 'target' is missing"),
        (lambda d: d["features"][1].update(dtype="double"), r"features\[1\]\.dtype: 'double'"),
        (lambda d: d["features"][0].update(std=0.0), r"features\[0\]\.std: 0.0 must be > 0"),
        (lambda d: d.update(input_shape=[3]), r"input_shape: \[3\] does not match the 6"),
        (lambda d: d.update(classes=["only"]), r"schema.classes: expected a list of at least 2"),
    ],
)
def test_schema_from_dict_names_the_bad_key(change, message: str) -> None:
    data = load_dataset("medpar").schema.to_dict()
    change(data)
    with pytest.raises(ConfigError, match=message):
        DatasetSchema.from_dict(data)


def test_normalise_frame_rejects_image_schema_and_missing_column() -> None:
    import pandas as pd

    with pytest.raises(DataValidationError, match=r"no tabular features"):
        normalise_frame(pd.DataFrame(), load_dataset("digits").schema, source="here")
    schema = DatasetSchema("t", (FeatureSpec("a"), FeatureSpec("b")), "y", ("n", "p"), (2,), None)
    with pytest.raises(DataValidationError, match=r"here: column 'b' is missing"):
        normalise_frame(pd.DataFrame({"a": [1.0]}), schema, source="here")


def _toy(labels: list[int]) -> Dataset:
    n = len(labels)
    schema = DatasetSchema("toy", (FeatureSpec("a"),), "y", ("0", "1", "2"), (1,), None)
    x = np.arange(n, dtype=np.float32)[:, None]
    return Dataset(x, np.asarray(labels, dtype=np.int64), np.full(n, "", dtype=str), schema)


def test_subset_by_index_and_mask() -> None:
    ds = _toy([0, 1, 2, 0])
    assert ds.subset([3, 1]).x[:, 0].tolist() == [3.0, 1.0]
    assert ds.subset(ds.y == 0).x[:, 0].tolist() == [0.0, 3.0]
    assert len(ds.subset(np.arange(0))) == 0


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=1, max_size=300),
    fraction=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_holdout_sizes_and_strata(labels: list[int], fraction: float, seed: int) -> None:
    ds = _toy(labels)
    n = len(labels)
    pool, holdout = split_holdout(ds, fraction, seed)
    expected = min(int(np.floor(fraction * n + 0.5)), n - 1)
    assert len(holdout) == expected and len(pool) == n - expected
    rows = np.concatenate([pool.x[:, 0], holdout.x[:, 0]]).astype(int)
    assert sorted(rows.tolist()) == list(range(n))  # disjoint and covering
    assert np.all(np.diff(holdout.x[:, 0]) > 0)  # original order kept
    counts = np.bincount(ds.y, minlength=3)
    held = np.bincount(holdout.y, minlength=3)
    assert np.all(np.abs(held - counts * expected / n) < 1.0 + 1e-9)  # stratified within a row
    again = split_holdout(ds, fraction, seed)[1]
    assert np.array_equal(again.x, holdout.x)


def test_split_zero_fraction_and_bad_fraction() -> None:
    ds = load_dataset("medpar")
    pool, holdout = split_holdout(ds, 0.0, seed=1)
    assert len(holdout) == 0 and np.array_equal(pool.x, ds.x)
    assert holdout.x.shape == (0, 6)
    with pytest.raises(ConfigError, match=r"dataset.holdout_fraction"):
        split_holdout(ds, 1.0, seed=0)
    with pytest.raises(ConfigError, match=r"dataset.test_fraction"):
        split_train_test(ds, -0.1, seed=0)


def test_split_train_test_matches_split_holdout() -> None:
    ds = load_dataset("medpar")
    train, test = split_train_test(ds, 0.25, seed=7)
    pool, holdout = split_holdout(ds, 0.25, seed=7)
    assert np.array_equal(train.x, pool.x) and np.array_equal(test.y, holdout.y)
    assert len(test) == 374  # round(0.25 * 1495)
