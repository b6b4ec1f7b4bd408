"""SecAgg+ protocol maths: keys, Shamir, masks, quantisation, the graph (pure, property-tested)."""

from __future__ import annotations

import itertools
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy.secagg import keys, masking, shamir
from privacy.secagg.graph import neighbour_graph, resolve_degree, share_threshold
from privacy.secagg.quantise import (
    dequantise_mean,
    mean_error_bound,
    quantise,
    ring_scale,
    to_signed,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
secrets32 = st.binary(min_size=32, max_size=32)


# ---- Shamir --------------------------------------------------------------------------------------
@SETTINGS
@given(secret=secrets32, data=st.data())
def test_any_t_shares_rebuild_the_secret_and_t_minus_1_do_not(secret, data):
    holders = data.draw(st.integers(2, 12))
    threshold = data.draw(st.integers(2, holders))
    indices = data.draw(st.permutations(range(1, 40)))[:holders]
    shares = shamir.split(secret, threshold, indices)
    subset = data.draw(st.permutations(indices))[:threshold]
    assert shamir.reconstruct({x: shares[x] for x in subset}) == secret
    fewer = subset[: threshold - 1]
    if fewer:  # t − 1 points define a polynomial of lower degree: not the secret
        try:
            wrong = shamir.reconstruct({x: shares[x] for x in fewer})
        except shamir.ShareError:
            wrong = None
        assert wrong != secret


def test_t_minus_1_shares_are_consistent_with_every_secret():
    """Given t − 1 shares, each candidate secret has exactly one polynomial through them."""
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3])
    for candidate in (bytes(32), os.urandom(32), secret):
        # the degree-2 polynomial through (0, candidate), (1, y1), (2, y2) gives some y3 at 3;
        # rebuilding from (1, 2, that y3) returns the candidate: the two shares alone allow all.
        c = int.from_bytes(candidate, "big")
        xs, ys = [0, 1, 2], [c, shares[1], shares[2]]
        y3 = 0
        for j in range(3):
            term = ys[j]
            for m in range(3):
                if m != j:
                    term = term * (3 - xs[m]) * pow(xs[j] - xs[m], -1, shamir.PRIME)
            y3 = (y3 + term) % shamir.PRIME
        assert shamir.reconstruct({1: shares[1], 2: shares[2], 3: y3}) == candidate


def test_share_bytes_round_trip_and_reject_non_field_values():
    value = shamir.PRIME - 1
    assert shamir.share_from_bytes(shamir.share_to_bytes(value)) == value
    with pytest.raises(shamir.ShareError):
        shamir.share_from_bytes((shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big"))
    with pytest.raises(shamir.ShareError):
        shamir.share_from_bytes(b"\x01" * 10)
    with pytest.raises(shamir.ShareError):
        shamir.split(os.urandom(32), 4, [1, 2, 3])


# ---- keys and encryption -------------------------------------------------------------------------
def test_key_agreement_is_symmetric_and_bound_to_round_purpose_and_pair():
    (a_priv, a_pub), (b_priv, b_pub) = keys.new_keypair(), keys.new_keypair()
    round_id = keys.new_round_id()
    k_ab = keys.agree(a_priv, b_pub, round_id, keys.PURPOSE_MASK, 1, 2)
    assert k_ab == keys.agree(b_priv, a_pub, round_id, keys.PURPOSE_MASK, 2, 1)
    others = {
        keys.agree(a_priv, b_pub, keys.new_round_id(), keys.PURPOSE_MASK, 1, 2),
        keys.agree(a_priv, b_pub, round_id, keys.PURPOSE_SHARES, 1, 2),
        keys.agree(a_priv, b_pub, round_id, keys.PURPOSE_MASK, 1, 3),
    }
    assert k_ab not in others and len(others) == 3
    assert keys.public_key_of(a_priv) == a_pub


def test_low_order_or_malformed_public_keys_are_refused():
    private, _ = keys.new_keypair()
    for bad in (bytes(32), b"\x01" + bytes(31), b"short"):
        with pytest.raises(keys.KeyAgreementError):
            keys.agree(private, bad, keys.new_round_id(), keys.PURPOSE_MASK, 1, 2)


def test_shares_open_only_for_their_round_direction_and_unaltered_bytes():
    key, round_id = os.urandom(32), keys.new_round_id()
    blob = keys.encrypt_share(key, round_id, 1, 2, b"payload")
    assert keys.decrypt_share(key, round_id, 1, 2, blob) == b"payload"
    altered = bytearray(blob)
    altered[-1] ^= 1
    for args in (
        (key, keys.new_round_id(), 1, 2, blob),  # replayed into another round
        (key, round_id, 2, 1, blob),  # reflected back to its sender
        (key, round_id, 1, 3, blob),  # redirected to another site
        (os.urandom(32), round_id, 1, 2, blob),  # wrong key
        (key, round_id, 1, 2, bytes(altered)),  # tampered
        (key, round_id, 1, 2, b"x" * 5),  # truncated
    ):
        with pytest.raises(keys.ShareDecryptionError):
            keys.decrypt_share(*args)


# ---- masks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [32, 64])
def test_mask_expansion_is_deterministic_per_seed_and_nonce(bits):
    seed = os.urandom(32)
    first = masking.expand(seed, masking.PAIR_MASK_NONCE, 1000, bits)
    assert first.dtype == masking.ring_dtype(bits)
    assert np.array_equal(first, masking.expand(seed, masking.PAIR_MASK_NONCE, 1000, bits))
    assert not np.array_equal(first, masking.expand(seed, masking.SELF_MASK_NONCE, 1000, bits))
    # a prefix of a longer stream: sites with different buffers agree on the values
    assert np.array_equal(first[:10], masking.expand(seed, masking.PAIR_MASK_NONCE, 10, bits))


def test_a_mask_is_the_aes_128_ctr_keystream_from_block_nonce_then_2():
    """The PRG computed through the GCM encryptor is plain AES-128-CTR (first 128 bits of the
    seed, counter block nonce ‖ 2, 3, …), recomputed here block by block with AES-ECB; chunked
    expansion (MaskStreams, in odd-sized chunks) gives the same stream."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = os.urandom(32)
    blocks = 70_000  # past 2^16 blocks, so a 16-bit carry in the counter is exercised
    counters = b"".join(masking.PAIR_MASK_NONCE + (2 + i).to_bytes(4, "big") for i in range(blocks))
    expected = Cipher(algorithms.AES(seed[:16]), modes.ECB()).encryptor().update(counters)
    stream = masking.expand(seed, masking.PAIR_MASK_NONCE, blocks * 4, 32)
    assert stream.tobytes() == expected
    chunked = np.zeros(blocks * 4, dtype=np.uint32)
    streams = masking.MaskStreams([(seed, masking.PAIR_MASK_NONCE, 1)], chunked.dtype)
    for begin in range(0, len(chunked), 70_001):
        streams.add_to(chunked[begin : begin + 70_001])
    assert np.array_equal(chunked, stream)


@SETTINGS
@given(n=st.integers(2, 6), length=st.integers(1, 300), bits=st.sampled_from([32, 64]))
def test_pairwise_masks_cancel_and_self_masks_come_off(n, length, bits):
    rng = np.random.default_rng(length)
    dtype = masking.ring_dtype(bits)
    inputs = [rng.integers(0, 2**31, length).astype(dtype) for _ in range(n)]
    seeds = {pair: os.urandom(32) for pair in itertools.combinations(range(1, n + 1), 2)}
    self_seeds = [os.urandom(32) for _ in range(n)]
    masked = [
        masking.mask_input(
            inputs[i - 1],
            i,
            self_seeds[i - 1],
            [(j, seeds[tuple(sorted((i, j)))]) for j in range(1, n + 1) if j != i],
        )
        for i in range(1, n + 1)
    ]
    total = np.sum(masked, axis=0, dtype=dtype)
    masking.remove_masks(total, self_seeds, [])
    assert np.array_equal(total, np.sum(inputs, axis=0, dtype=dtype))
    assert all(not np.array_equal(m, x) for m, x in zip(masked, inputs, strict=True))


# ---- quantisation --------------------------------------------------------------------------------
def _exact_mean(rows, weights, clip: float) -> list[Fraction]:
    """Σ w_i · clip(u_i) / Σ w_i in exact rational arithmetic."""
    c = Fraction(clip)
    total = sum(weights)
    return [
        sum(w * max(-c, min(c, Fraction(float(r[j])))) for r, w in zip(rows, weights, strict=True))
        / total
        for j in range(len(rows[0]))
    ]


def _check_ring_and_bound(rows, weights, max_weight: int, clip: float, bits: int) -> None:
    n = len(rows)
    scale = ring_scale(n, bits)
    assert n * scale <= 2 ** (bits - 1) - 1  # the scale itself rules out a wrap
    quantised = [
        quantise(row, clip_range=clip, weight=w, max_weight=max_weight, scale=scale, bits=bits)[0]
        for row, w in zip(rows, weights, strict=True)
    ]
    signed = [to_signed(q, bits) for q in quantised]
    assert all(np.abs(s).max() <= scale for s in signed)
    ring_sum = np.sum(quantised, axis=0, dtype=masking.ring_dtype(bits))
    exact_sum = [sum(int(s[j]) for s in signed) for j in range(len(rows[0]))]  # Python ints
    assert [int(v) for v in to_signed(ring_sum, bits)] == exact_sum  # exact, no wrap
    total = sum(weights)
    if total:
        mean = dequantise_mean(
            ring_sum,
            clip_range=clip,
            total_weight=total,
            max_weight=max_weight,
            scale=scale,
            bits=bits,
        )
        bound = Fraction(
            mean_error_bound(
                n, clip_range=clip, total_weight=total, max_weight=max_weight, scale=scale
            )
        )
        for got, want in zip(mean, _exact_mean(rows, weights, clip), strict=True):
            assert abs(Fraction(float(got)) - want) <= bound, (float(got), float(want))


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(1, 30),
    bits=st.sampled_from([32, 64]),
    clip=st.floats(0.01, 10),
)
def test_the_ring_sum_of_n_quantised_updates_never_wraps(data, n, bits, clip):
    length = data.draw(st.integers(1, 20))
    max_weight = data.draw(st.integers(1, 10_000))
    rows = [
        np.array(
            data.draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=length, max_size=length))
        )
        for _ in range(n)
    ]
    weights = [data.draw(st.integers(0, max_weight)) for _ in range(n)]
    _check_ring_and_bound(rows, weights, max_weight, clip, bits)


@SETTINGS
@given(
    n=st.sampled_from([1, 2, 3, 1023, 1024, 1025, 2048, 4099]),
    bits=st.sampled_from([32, 64]),
    clip=st.sampled_from([1e-6, 0.1, 1.0, 2.0, 3.0, 1e6]),
    sign=st.sampled_from([1.0, -1.0]),
    max_weight=st.sampled_from([1, 7, 100_000, 2**53]),
    extreme=st.floats(0.999999, 10.0),
)
def test_sites_at_the_clip_extremes_never_wrap_and_keep_the_error_bound(
    n, bits, clip, sign, max_weight, extreme
):
    """Every site at ±clip (or past it) with the largest weight: the worst case for a wrap."""
    rows = [np.array([sign * clip * extreme, -sign * clip, sign * clip / 3])] * n
    _check_ring_and_bound(rows, [max_weight] * n, max_weight, clip, bits)


def test_quantise_counts_clipped_values_and_refuses_nan_and_overweight():
    q, clipped = quantise(
        np.array([0.5, -3.0, 3.0]), clip_range=1.0, weight=1, max_weight=1, scale=100, bits=32
    )
    assert clipped == 2 and list(to_signed(q, 32)) == [50, -100, 100]
    with pytest.raises(ValueError, match="NaN"):
        quantise(np.array([np.nan]), clip_range=1, weight=1, max_weight=1, scale=9, bits=32)
    with pytest.raises(ValueError, match="weight"):
        quantise(np.array([0.0]), clip_range=1, weight=5, max_weight=4, scale=9, bits=32)


# ---- the neighbour graph and the threshold -------------------------------------------------------
@SETTINGS
@given(n=st.integers(2, 200), k=st.integers(0, 60), seed=secrets32)
def test_neighbour_graph_is_symmetric_regular_and_loop_free(n, k, seed):
    degree = resolve_degree(n, k)
    graph = neighbour_graph(n, degree, seed)
    assert sorted(graph) == list(range(1, n + 1))
    for i, neighbours in graph.items():
        assert i not in neighbours and len(set(neighbours)) == len(neighbours)
        assert len(neighbours) == degree
        assert all(i in graph[j] for j in neighbours)
    assert graph == neighbour_graph(n, degree, seed)  # a pure function of the seed


def test_degree_is_the_full_graph_for_small_federations_and_logarithmic_beyond():
    assert resolve_degree(10, 0) == 9 and resolve_degree(64, 0) == 63
    assert resolve_degree(1000, 0) == 80  # 8·⌈log2 1000⌉
    assert resolve_degree(100, 5) == 6  # rounded up to even
    assert resolve_degree(5, 10) == 4


@pytest.mark.parametrize(
    ("group", "threshold", "expected"),
    [
        (4, 0.66, 3),
        (10, 0.66, 7),
        (3, 0.66, 2),
        (2, 0.66, 2),
        (10, 0.51, 6),
        (10, 1.0, 10),
        (10, 3, 6),
        (10, 8, 8),
        (5, 7, 7),
    ],
)
def test_threshold_is_at_least_a_strict_majority_of_the_share_group(group, threshold, expected):
    assert share_threshold(group, threshold) == expected


# ---- zero-copy views and chunked quantisation: the same values as the copying whole-vector path --
@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_]),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    fortran=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_array_view_reads_the_same_values_as_array_numpy(dtype, shape, fortran, seed):
    from flwr.app import Array

    from privacy.secagg.layout import array_view

    values = np.random.default_rng(seed).normal(0, 10, shape).astype(dtype)
    values = np.asfortranarray(values) if fortran else values
    array = Array(values)
    view = array_view(array)
    expected = array.numpy()
    assert view.dtype == expected.dtype and view.shape == expected.shape
    assert np.array_equal(view, expected)
    assert not view.flags.writeable  # a view of the record's bytes, never written through


def test_array_view_refuses_a_truncated_payload():
    from flwr.app import Array

    from privacy.secagg.layout import array_view

    whole = Array(np.arange(10, dtype=np.float32))
    cut = Array(dtype=whole.dtype, shape=whole.shape, stype=whole.stype, data=whole.data[:-4])
    with pytest.raises(ValueError):
        array_view(cut)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    chunk=st.integers(1, 97),
    bits=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**16),
)
def test_chunked_update_quantises_to_the_same_ring_vector(sizes, chunk, bits, seed):
    from flwr.app import Array, ArrayRecord

    from privacy.secagg.layout import VectorLayout
    from privacy.secagg.quantise import quantise_chunks

    rng = np.random.default_rng(seed)
    start = {f"w{i}": rng.normal(0, 1, n).astype(np.float32) for i, n in enumerate(sizes)}
    trained = {k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) for k, v in start.items()}
    start_record = ArrayRecord({k: Array(v) for k, v in start.items()})
    trained_record = ArrayRecord({k: Array(v) for k, v in trained.items()})
    layout = VectorLayout.of(start_record)
    exact = np.concatenate([trained[k].astype(np.float64) - start[k] for k in start])
    assert np.array_equal(layout.update_vector(trained_record, start_record), exact)
    options = dict(clip_range=1.0, weight=3, max_weight=7, scale=ring_scale(5, bits), bits=bits)
    whole, whole_clipped = quantise(exact, **options)
    chunks = layout.update_chunks(trained_record, start_record, chunk_values=chunk)
    fused, fused_clipped = quantise_chunks(chunks, layout.length, **options)
    assert np.array_equal(fused, whole) and fused_clipped == whole_clipped
    with pytest.raises(ValueError):  # fewer values than the layout promised
        quantise_chunks(iter([exact[:-1]]), layout.length, **options)
