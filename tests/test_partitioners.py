"""Partitioners: exact size rules, disjointness, natural-site choice and label skew."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedgov.datasets import load_dataset
from fedgov.errors import ConfigError
from fedgov_data.partitioners import (
    dirichlet_partition,
    iid_partition,
    label_skew,
    natural_partition,
    partition,
    site_ids,
)


def _assert_sorted_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    return joined


def test_natural_keeps_largest_sites_ties_by_label() -> None:
    labels = np.array(["b", "a", "c", "b", "d", "c", "a", "d", "d", "e"])
    # sizes: a 2, b 2, c 2, d 3, e 1
    ids, parts = natural_partition(labels, 3)
    assert ids == ["a", "b", "d"]  # d (3) then a, b win the tie of 2 against c by label
    assert [p.tolist() for p in parts] == [[1, 6], [0, 3], [4, 7, 8]]
    ids, parts = natural_partition(labels, 0)
    assert ids == ["a", "b", "c", "d", "e"]
    assert sorted(_assert_sorted_disjoint(parts).tolist()) == list(range(10))


def test_natural_too_many_sites_names_the_key_and_maximum() -> None:
    with pytest.raises(ConfigError, match=r"federation.num_sites: 7 .*at most 6"):
        natural_partition(load_dataset("randhie").site, 7)
    with pytest.raises(ConfigError, match=r"federation.num_sites"):
        natural_partition(np.array(["a"]), -1)


def test_natural_on_bundled_datasets() -> None:
    ds = load_dataset("randhie")
    ids, parts = natural_partition(ds.site, 3)
    assert ids == ["site-1", "site-2", "site-6"]
    assert [len(p) for p in parts] == [4462, 4036, 3571]  # the 3 largest of the 6 sites
    for site_id, part in zip(ids, parts, strict=True):
        assert set(ds.site[part]) == {site_id}
    ids, parts = partition(load_dataset("medpar"), "natural", 0, 0.5, seed=0)
    assert len(ids) == 54 and sum(len(p) for p in parts) == 1495
    ids, _ = partition(load_dataset("loans"), "natural", 5, 0.5, seed=0)
    assert ids == ["CA", "FL", "IL", "NY", "TX"]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 500), num_sites=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_iid_sizes_differ_by_at_most_one(n: int, num_sites: int, seed: int) -> None:
    assume(num_sites <= n)
    parts = iid_partition(n, num_sites, seed)
    assert len(parts) == num_sites
    assert sorted(_assert_sorted_disjoint(parts).tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(n, num_sites, seed), strict=True)
    )


def test_iid_rejects_bad_site_counts() -> None:
    with pytest.raises(ConfigError, match=r"federation.num_sites: 0"):
        iid_partition(10, 0, seed=0)
    with pytest.raises(ConfigError, match=r"federation.num_sites: 11 sites for 10 rows"):
        iid_partition(10, 11, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(100, 1500),
    num_classes=st.integers(2, 10),
    num_sites=st.integers(2, 8),
    alpha=st.sampled_from([0.3, 1.0, 10.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_every_row_with_min_size(
    n: int, num_classes: int, num_sites: int, alpha: float, seed: int
) -> None:
    # ≥ 40 rows per site on average: with fewer, small α may (rightly) find no valid split.
    assume(n >= 40 * num_sites)
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    parts = dirichlet_partition(labels, num_sites, alpha, seed, min_size=10)
    assert len(parts) == num_sites
    assert sorted(_assert_sorted_disjoint(parts).tolist()) == list(range(n))
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(labels, num_sites, alpha, seed, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1000, 3000),
    num_sites=st.integers(3, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_small_alpha_skews_labels_more(n: int, num_sites: int, seed: int) -> None:
    labels = np.arange(n) % 10  # balanced, 10 classes
    skewed = label_skew(labels, dirichlet_partition(labels, num_sites, 0.1, seed), 10)
    mild = label_skew(labels, dirichlet_partition(labels, num_sites, 100.0, seed), 10)
    iid = label_skew(labels, iid_partition(n, num_sites, seed), 10)
    # over 400 seeds: skewed >= 0.41, mild and iid <= 0.11
    assert skewed > 0.3 and max(mild, iid) < 0.15


def test_dirichlet_errors_name_the_key() -> None:
    labels = np.arange(200) % 2
    with pytest.raises(ConfigError, match=r"dataset.alpha: 0"):
        dirichlet_partition(labels, 4, 0.0, seed=0)
    with pytest.raises(ConfigError, match=r"dataset.alpha: -1"):
        dirichlet_partition(labels, 4, -1.0, seed=0)
    with pytest.raises(ConfigError, match=r"need 210 rows; the data has 200"):
        dirichlet_partition(labels, 21, 1.0, seed=0)
    # 2 classes over 19 sites at tiny alpha: nearly all rows land on 2 sites, every time
    with pytest.raises(ConfigError, match=r"raise dataset.alpha or lower federation.num_sites"):
        dirichlet_partition(labels, 19, 0.001, seed=0)


def test_partition_dispatch_and_ids() -> None:
    ds = load_dataset("digits")
    ids, parts = partition(ds, "iid", 4, 0.5, seed=0)
    assert ids == ["site-00", "site-01", "site-02", "site-03"]
    assert [len(p) for p in parts] == [450, 449, 449, 449]
    ids, parts = partition(ds, "dirichlet", 5, 0.5, seed=0)
    assert ids[-1] == "site-04" and sum(len(p) for p in parts) == 1797
    with pytest.raises(ConfigError, match=r"no natural sites.*iid or dirichlet"):
        partition(ds, "natural", 0, 0.5, seed=0)
    with pytest.raises(
        ConfigError, match=r"dataset.partitioner: 'random'.*natural, iid, dirichlet"
    ):
        partition(ds, "random", 4, 0.5, seed=0)
    assert site_ids(101)[0] == "site-000" and site_ids(100)[-1] == "site-99"


def test_label_skew_exact_values() -> None:
    labels = np.array([0, 0, 1, 1])
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])], 2) == pytest.approx(0.5)
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])], 2) == 0.0
    # site [0, 1, 2]: (2/3, 1/3) vs (1/2, 1/2) -> 1/6; site [3]: (0, 1) -> 1/2; empty one skipped
    parts = [np.array([0, 1, 2]), np.array([3]), np.array([], dtype=np.int64)]
    assert label_skew(labels, parts, 2) == pytest.approx((1 / 6 + 1 / 2) / 2)
