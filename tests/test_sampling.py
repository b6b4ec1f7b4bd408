"""Site sampling per round: counts, fractions with a floor, and a seeded draw by site id."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from server.sampling import sample_sites, sites_per_round

site_lists = st.lists(
    st.text(alphabet="abcdefghij-0123456789", min_size=1, max_size=8),
    min_size=1,
    max_size=60,
    unique=True,
)


@given(available=st.integers(1, 500), count=st.integers(1, 600), minimum=st.integers(1, 10))
def test_a_count_is_taken_as_is_up_to_the_available_sites(available, count, minimum):
    assert sites_per_round(available, float(count), minimum) == min(count, available)


@given(
    available=st.integers(1, 500),
    fraction=st.floats(0.001, 0.999),
    minimum=st.integers(1, 10),
)
def test_a_fraction_rounds_up_and_respects_the_floor(available, fraction, minimum):
    expected = min(max(math.ceil(fraction * available), minimum), available)
    assert sites_per_round(available, fraction, minimum) == expected


def test_zero_means_every_site():
    assert sites_per_round(17, 0.0, 2) == 17


@given(sites=site_lists, seed=st.integers(0, 2**31), rnd=st.integers(1, 1000), data=st.data())
def test_sample_is_distinct_sorted_and_reproducible(sites, seed, rnd, data):
    count = data.draw(st.integers(1, len(sites)))
    chosen = sample_sites(sites, count, seed, rnd)
    assert len(chosen) == count == len(set(chosen))
    assert set(chosen) <= set(sites)
    assert chosen == sorted(chosen)
    # Only the set of ids matters, not the order nodes connected in.
    assert sample_sites(list(reversed(sites)), count, seed, rnd) == chosen


def test_rounds_draw_different_sites_and_every_site_gets_its_turn():
    sites = [f"site-{i:02d}" for i in range(20)]
    draws = [tuple(sample_sites(sites, 5, seed=0, server_round=r)) for r in range(1, 41)]
    assert len(set(draws)) > 30
    counts = {s: sum(s in d for d in draws) for s in sites}
    assert min(counts.values()) >= 3  # 40 rounds × 5 / 20 sites = 10 expected each
