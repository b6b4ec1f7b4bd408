"""fedgov's SecAgg+ against plain rounds and against Flower's own (legacy) SecAgg+, side by side.

    python -m benchmarks.secagg [--sites 10] [--hidden 1400] [--rounds 4] [--epochs 1]
                                [--repeats 1] [--quick]

One table from one run:

1. Round time, in Flower's simulation engine (Ray, one CPU per site), of four apps doing the same
   work — ``--sites`` sites of the ``synthetic`` dataset, fedgov's MLP with ``--hidden`` units
   (1400: 997,502 parameters), the same initial weights, ``--epochs`` local SGD epochs (batch 32,
   lr 0.05, momentum 0.9) with the same shuffling seeds, every site training and evaluating
   every round, a central evaluation each round:
   - fedgov, ``secagg=off`` and ``secagg=secaggplus`` (threshold 0.66 → t = 7 of 10, full graph);
   - Flower 1.42's legacy app (``benchmarks._flower_secaggplus_app``) with its default fit
     workflow and with ``SecAggPlusWorkflow`` (num_shares = sites, the same t).
   Each run is a fresh subprocess (Ray starts fresh); the order alternates over repeats. The
   steady round time is the median of rounds 2 … R (round 1 also starts the Ray actors).
   fedgov's rows run on fedgov's engine, which delivers each message to the simulated sites as
   soon as it is stored (``simulations.delivery``); Flower's rows run on Flower's stock engine,
   which scans for messages every 0.1 s — one such wait per exchange, and its SecAgg+ has
   several exchanges per round. fedgov's steady SecAgg+ round has one exchange more than its
   plain train exchange (the unmasking): each site signs the survivor set with its masked
   input, so without dropouts there is no consistency exchange, and the next round's key
   stages ride on this round's masked-input and unmask exchanges (``server.secagg_round``);
   the stage seconds show them as 0.
2. Client mask generation: MB/s of 32-bit mask values, fedgov's AES-128-CTR keystream into a
   preallocated buffer (one mask, and ten masks applied to an input in cache-sized chunks), the
   ChaCha20 keystream it used before, and Flower's ``pseudo_rand_gen`` (MT19937).
3. Server unmasking time (rebuild the secrets from shares, remove every leftover mask) for
   ``--sites`` sites and 1M values, as dropouts after key sharing grow to the threshold's limit.

Targets: fedgov SecAgg+ round ≤ 1.3× its plain round; faster than Flower's SecAgg+ round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED = 0
BATCH_SIZE = 32
LR = 0.05
MOMENTUM = 0.9
TEST_FRACTION = 0.2
THRESHOLD = 0.66
VARIANTS = ("fedgov-off", "fedgov-secagg", "flower-plain", "flower-secagg")
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


# ---- one app run, in its own subprocess ----------------------------------------------------------
def _run_fedgov(args: argparse.Namespace, secure: bool, work: Path) -> dict:
    from fedgov.config import RunConfig
    from simulations.engine import run_simulation

    output = work / "fedgov-output"
    cfg = RunConfig(rounds=args.rounds, seed=SEED, output_dir=str(output), progress=False)
    cfg.dataset.name, cfg.dataset.partitioner = "synthetic", "natural"
    cfg.dataset.test_fraction = TEST_FRACTION
    cfg.model.name, cfg.model.hidden = "mlp", args.hidden
    cfg.train.local_epochs, cfg.train.batch_size = args.epochs, BATCH_SIZE
    cfg.train.lr, cfg.train.momentum = LR, MOMENTUM
    cfg.federation.num_sites = args.sites
    if secure:
        cfg.secagg.name, cfg.secagg.threshold = "secaggplus", THRESHOLD
    started = time.perf_counter()
    run_simulation(cfg)
    seconds = time.perf_counter() - started
    metrics = json.loads((output / "metrics.json").read_text())
    rounds = metrics["rounds"]
    return {
        "run_seconds": seconds,
        "round_seconds": [r["seconds"] for r in rounds],
        "central_eval_accuracy": metrics["final"]["central_eval_accuracy"],
        "completed": all(not r.get("aborted") for r in rounds),
        "stages": rounds[-1].get("secagg", {}) and rounds[-1]["secagg"]["stage_seconds"],
    }


def _run_flower(args: argparse.Namespace, secure: bool, work: Path) -> dict:
    from benchmarks import _plain_flower_app as plain

    result_path = work / "flower-result.json"
    settings = plain.PlainSettings(
        sites=args.sites,
        rounds=args.rounds,
        seed=SEED,
        hidden=args.hidden,
        local_epochs=args.epochs,
        batch_size=BATCH_SIZE,
        lr=LR,
        momentum=MOMENTUM,
        test_fraction=TEST_FRACTION,
        result_path=str(result_path),
    )
    os.environ[plain.PLAIN_APP_ENV] = plain.encode_settings(settings)  # Ray workers inherit it
    if secure:
        from privacy.secagg.graph import share_threshold

        threshold = share_threshold(args.sites, THRESHOLD)  # the t fedgov uses
        os.environ["FEDGOV_BENCH_FLOWER_SECAGG"] = json.dumps(
            {"num_shares": args.sites, "threshold": threshold}
        )
    from flwr.simulation import run_simulation

    from benchmarks import _flower_secaggplus_app as legacy

    started = time.perf_counter()
    run_simulation(
        server_app=legacy.server_app,
        client_app=legacy.client_app,
        num_supernodes=args.sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    seconds = time.perf_counter() - started
    result = json.loads(result_path.read_text())
    return {
        "run_seconds": seconds,
        "round_seconds": result["round_seconds"],
        "central_eval_accuracy": result["central_eval_accuracy"],
        "completed": result["moved"] and result["rounds_done"] == args.rounds,
    }


def child_main(args: argparse.Namespace) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    work = Path(args.work)
    family, mode = args.variant.split("-")
    runner = _run_fedgov if family == "fedgov" else _run_flower
    measured = runner(args, mode == "secagg", work)
    steady = measured["round_seconds"][1:] or measured["round_seconds"]
    measured["steady_round_seconds"] = statistics.median(steady)
    Path(args.result).write_text(json.dumps(measured))


# ---- micro-benchmarks, in the parent -------------------------------------------------------------
def mask_throughput(values: int = 1_000_000, repeats: int = 20) -> dict[str, float]:
    """MB/s of 32-bit mask values: fedgov (one mask; ten applied to an input) and Flower."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from privacy.secagg import masking

    megabytes = values * 4 / 1e6

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    seed = os.urandom(32)
    buffer = np.empty(values, dtype=np.uint32)
    target = np.zeros(values, dtype=np.uint32)
    ten = [(os.urandom(32), masking.PAIR_MASK_NONCE, 1) for _ in range(10)]

    def chacha20(out: np.ndarray) -> None:  # the PRG fedgov used before AES-128-CTR
        view = memoryview(out).cast("B")
        Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update_into(view, view)

    def openssl_ctr(out: np.ndarray) -> None:  # the same keystream through OpenSSL's CTR mode
        view = memoryview(out).cast("B")
        counter = modes.CTR(masking.PAIR_MASK_NONCE + (2).to_bytes(4, "big"))
        Cipher(algorithms.AES(seed[:16]), counter).encryptor().update_into(view, view)

    return {
        "fedgov AES-128-CTR (via GCM, VAES), one mask into a buffer": megabytes
        / best(lambda: masking.expand_into(seed, masking.PAIR_MASK_NONCE, buffer)),
        "the same keystream through OpenSSL's CTR mode, one mask": megabytes
        / best(lambda: openssl_ctr(buffer)),
        "ChaCha20 (fedgov's PRG before), one mask": megabytes / best(lambda: chacha20(buffer)),
        "fedgov AES-128-CTR (via GCM, VAES), ten masks added": 10
        * megabytes
        / best(lambda: masking.apply_masks(target, ten)),
        "Flower pseudo_rand_gen (MT19937), one mask": megabytes
        / best(
            lambda: pseudo_rand_gen(seed, 2**32, [(values,)]),
        ),
    }


def client_work_seconds(sites: int, length: int, repeats: int = 5) -> float:
    """One site's SecAgg+ work in a round (best of ``repeats``), actively secure: fresh keys and
    its advert signed with its identity key, the peers' signatures checked against the roster,
    shares split and encrypted, its neighbours' shares opened, the global model's digest and its
    contribution and the expected survivor set signed, a ``length``-value update quantised and
    masked in one pass, the survivors' signatures checked and the unmask answered (a round
    without dropouts: the consistency signatures came with the inputs)."""
    import dataclasses

    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.receipts import public_key_bytes
    from privacy.secagg import roster
    from privacy.secagg.client import SiteSecAgg
    from privacy.secagg.quantise import quantise_chunks
    from privacy.secagg.server import SecAggSettings, ServerSecAgg

    ids = tuple(f"site-{i:02d}" for i in range(sites))
    identity = {i: Ed25519PrivateKey.generate() for i in range(1, sites + 1)}
    listed = {ids[i - 1]: public_key_bytes(key) for i, key in identity.items()}
    governance = [Ed25519PrivateKey.generate() for _ in range(2)]
    signed = roster.sign_roster(roster.Roster(1, listed), governance)
    config = SecAggSettings(threshold=THRESHOLD, max_weight=1000, roster=signed)
    update = np.random.default_rng(0).normal(0, 0.05, length)
    global_model = np.zeros(length, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        server = ServerSecAgg(
            sites, config, length, server_round=1, weight_scale=1000, site_ids=ids
        )

        def new_site(i: int, server: ServerSecAgg = server) -> SiteSecAgg:
            return SiteSecAgg(
                server.setup_request(i), THRESHOLD, 1000, site_id=ids[i - 1], roster=listed
            )

        others = {i: new_site(i) for i in server.sites[1:]}
        started = time.perf_counter()
        anchor = roster.TrustAnchor(ids[0], tuple(public_key_bytes(k) for k in governance), 2)
        roster.verify_roster(signed, anchor)
        site = new_site(1)
        adverts = {1: site.advert(identity[1])}
        elapsed = time.perf_counter() - started
        adverts.update({i: o.advert(identity[i]) for i, o in others.items()})
        server.receive_adverts(adverts)
        shares = {i: o.share_keys(server.share_keys_request(i)) for i, o in others.items()}
        started = time.perf_counter()
        shares[1] = site.share_keys(server.share_keys_request(1))
        elapsed += time.perf_counter() - started
        server.receive_ciphertexts(shares)
        server.expect_inputs()
        request = server.masked_input_request(1)
        config_digest = roster.config_digest({"server-round": 1})
        signatures = {}
        for i, o in others.items():
            o.contribution(identity[i], roster.model_digest([("w", global_model)]), config_digest)
            o.accept_shares(server.masked_input_request(i))
            o.mask(np.zeros(length, dtype=np.uint32))
            signatures[i] = o.early_signature(identity[i])
        started = time.perf_counter()
        site.accept_shares(request)
        model_digest = roster.model_digest([("w", global_model)])
        site.contribution(identity[1], model_digest, config_digest)
        masks = site.mask_streams(np.dtype(np.uint32))
        chunks = (update[b : b + (1 << 15)] for b in range(0, length, 1 << 15))
        quantise_chunks(
            chunks,
            length,
            clip_range=2.0,
            weight=500,
            max_weight=1000,
            scale=server.scale,
            bits=32,
            then=masks.add_to,
        )
        site.input_masked()
        signatures[1] = site.early_signature(identity[1])
        site.reveal(dataclasses.replace(server.unmask_request(), signatures=signatures))
        best = min(best, elapsed + time.perf_counter() - started)
    return best


def unmasking_times(sites: int, length: int, dropouts: list[int]) -> list[tuple[int, float, int]]:
    """(dropouts, server seconds to rebuild secrets and unmask, survivors) per dropout count."""
    import numpy as np

    from privacy.secagg.client import SiteSecAgg
    from privacy.secagg.protocol import MaskedInput
    from privacy.secagg.server import SecAggSettings, ServerSecAgg

    config = SecAggSettings(threshold=THRESHOLD, max_weight=1)
    rows = []
    for dropped in dropouts:
        server = ServerSecAgg(sites, config, length, server_round=1, weight_scale=1)
        clients = {i: SiteSecAgg(server.setup_request(i), THRESHOLD, 1) for i in server.sites}
        server.receive_adverts({i: c.advert() for i, c in clients.items()})
        server.receive_ciphertexts(
            {i: c.share_keys(server.share_keys_request(i)) for i, c in clients.items()}
        )
        vector = np.zeros(length, dtype=np.uint32)
        inputs = {}
        for i, site in clients.items():
            site.accept_shares(server.masked_input_request(i))
            if i > sites - dropped:  # the last ones vanish after sharing their keys
                continue
            inputs[i] = MaskedInput(site.mask(vector), weight=1)
        server.receive_masked_inputs(inputs)
        check = server.consistency_request()
        server.receive_signatures({i: clients[i].consistency(check) for i in server.alive()})
        request = server.unmask_request()
        answers = {i: clients[i].reveal(request) for i in server.unmask_targets()}
        started = time.perf_counter()
        result = server.finish(answers)
        rows.append((dropped, time.perf_counter() - started, len(result.survivors)))
    return rows


# ---- the parent: subprocesses and the table ------------------------------------------------------
def _run_variant(variant: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"secagg-bench-{variant}-") as work:
        result = Path(work) / "result.json"
        argv = [
            sys.executable,
            "-m",
            "benchmarks.secagg",
            "--variant",
            variant,
            "--work",
            work,
            "--result",
            str(result),
            "--sites",
            str(args.sites),
            "--hidden",
            str(args.hidden),
            "--rounds",
            str(args.rounds),
            "--epochs",
            str(args.epochs),
        ]
        env = {**os.environ, **FLOWER_ENV}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not result.exists():
            raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1400, help="MLP width (1400: ~1M params)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 sites, 3 rounds, a small model")
    parser.add_argument(
        "--only",
        choices=("all", "fedgov"),
        default="all",
        help="fedgov: only fedgov's two rows (more repeats in the same time)",
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child_main(args)
        return
    if args.quick:
        args.sites, args.rounds, args.hidden = 5, 3, 256
    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)

    from fedgov.models import build_model

    parameters = sum(p.numel() for p in build_model("mlp", (10,), 2, args.hidden).parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"SecAgg+ benchmark: {args.sites} sites, MLP of {parameters:,} parameters, "
        f"{args.rounds} rounds, {args.epochs} local epoch(s), Ray simulation, "
        f"{os.cpu_count()} CPUs (load average {load:.1f} at the start), "
        f"{args.repeats} repeat(s)",
        flush=True,
    )
    variants = VARIANTS if args.only == "all" else VARIANTS[:2]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else tuple(reversed(variants))
        for variant in order:
            print(f"  running {variant} …", flush=True)
            runs[variant].append(_run_variant(variant, args))

    def median(variant: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[variant])

    rows = {v: (median(v, "steady_round_seconds"), median(v, "run_seconds")) for v in variants}
    print("\n1. Round time (steady = median of rounds 2…R; run = the whole simulation)\n")
    print(
        f"  {'app':<34} {'steady round s':>14} {'whole run s':>12} {'central acc':>11} ok"
        "  steady round s of each run"
    )
    names = {
        "fedgov-off": "fedgov, secagg=off",
        "fedgov-secagg": "fedgov, secagg=secaggplus",
        "flower-plain": "Flower legacy, plain fit",
        "flower-secagg": "Flower legacy, SecAggPlusWorkflow",
    }
    for variant in variants:
        steady, whole = rows[variant]
        accuracy = runs[variant][-1]["central_eval_accuracy"]
        ok = all(run["completed"] for run in runs[variant])
        each = ", ".join(f"{run['steady_round_seconds']:.2f}" for run in runs[variant])
        print(
            f"  {names[variant]:<34} {steady:>14.2f} {whole:>12.1f} {accuracy:>11.4f} "
            f"{'yes' if ok else 'NO ':<3}  {each}"
        )
    ours = rows["fedgov-secagg"][0] / rows["fedgov-off"][0]
    print(
        f"\n  fedgov SecAgg+ / fedgov plain, steady round: {ours:.2f}× (target ≤ 1.3×); "
        f"whole run {rows['fedgov-secagg'][1] / rows['fedgov-off'][1]:.2f}×"
    )
    pairs = [
        run["steady_round_seconds"] / plain["steady_round_seconds"]
        for run, plain in zip(runs["fedgov-secagg"], runs["fedgov-off"], strict=True)
    ]
    print(
        "  the same ratio per repeat (the two runs back to back): "
        + ", ".join(f"{ratio:.2f}×" for ratio in pairs)
        + f"; median {statistics.median(pairs):.2f}×"
    )
    if "flower-secagg" in rows:
        _print_flower_ratios(rows)
    stages = runs["fedgov-secagg"][-1].get("stages")
    if stages:
        print(f"  fedgov SecAgg+ stage seconds (last round): {stages}")
    if hasattr(os, "getloadavg"):
        print(f"  load average after the runs: {os.getloadavg()[0]:.1f}")
    _print_crypto_sections(args)


def _print_flower_ratios(rows: dict[str, tuple[float, float]]) -> None:
    theirs = rows["flower-secagg"][0] / rows["flower-plain"][0]
    print(
        f"  Flower SecAgg+ / Flower plain, steady round: {theirs:.2f}×; "
        f"whole run {rows['flower-secagg'][1] / rows['flower-plain'][1]:.2f}×"
    )
    print(
        f"  fedgov SecAgg+ / Flower SecAgg+, steady round: "
        f"{rows['fedgov-secagg'][0] / rows['flower-secagg'][0]:.2f}× (target < 1); whole run "
        f"{rows['fedgov-secagg'][1] / rows['flower-secagg'][1]:.2f}×"
    )


def _print_crypto_sections(args: argparse.Namespace) -> None:
    print("\n2. Client mask generation, 1M 32-bit values (MB/s of mask values, best of 20)\n")
    for name, rate in mask_throughput().items():
        print(f"  {name:<56} {rate:>9,.0f} MB/s")
    work = client_work_seconds(args.sites, 1_000_000)
    print(
        f"  one site's whole SecAgg+ work in a round (keys, signatures checked against the "
        f"roster, shares, model digest, quantise, {args.sites} masks): {work * 1e3:.0f} ms"
    )

    from privacy.secagg.graph import share_threshold

    threshold_limit = args.sites - share_threshold(args.sites, THRESHOLD)
    print(
        f"\n3. Server unmasking, {args.sites} sites × 1M values, sites dropping after sharing "
        f"keys (up to {threshold_limit} with t = {args.sites - threshold_limit})\n"
    )
    print(f"  {'dropouts':>8} {'survivors':>9} {'unmask s':>9}")
    for dropped, seconds, survivors in unmasking_times(
        args.sites, 1_000_000, list(range(0, threshold_limit + 1))
    ):
        print(f"  {dropped:>8} {survivors:>9} {seconds:>9.3f}")


if __name__ == "__main__":
    main()
