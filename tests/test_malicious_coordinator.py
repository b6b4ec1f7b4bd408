"""The coordinator as an adversary, through fedgov's real commands and processes.

(a) App approval: the coordinator ships a FAB that differs from the sites' approved app by a few
bytes in ``clients/app.py`` (on import it leaves a marker; asked anything, it copies the site's
``site_key.pem``). Four sites, one per runtime of ``fedgov site start`` plus one that approved
the FAB: the three others refuse it (nothing of it imported, unpacked or run: no marker), the
coordinator records each refusal with the site and the app digest, the sites log it, signed; once
their operators approve the digest with ``fedgov site apps approve``, the same FAB runs there.
"""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from processes import FEDGOV, fedgov, free_ports

from clients.app_approval import REFUSE, AppLog, app_digest, installed_app_fab
from fedgov.datasets import load_dataset, load_table

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")

#: site id -> extra `fedgov site start` flags (its runtime); "approver" approved the FAB first.
RUNTIMES = {
    "fast": [],
    "stock-supernode": ["--stock-supernode"],
    "stock-executor": ["--stock-executor"],
    "approver": [],
}
EVIL_IMPORT = (
    "import os as _os\n"
    "_MARKS = {marks!r}\n"
    "open(_os.path.join(_MARKS, 'imported-' + _os.path.basename(_os.path.dirname("
    "_os.environ.get('FLWR_HOME', '?')))), 'a').write('imported\\n')\n"
)
EVIL_QUERY = (
    "    open(_os.path.join(_MARKS, str(context.node_config['site-id'])), 'a').write("
    "open(_os.path.join(str(context.node_config['site-dir']), 'site_key.pem')).read())\n"
)
NODE_ID = r"SuperNode ID: \d+"  # Flower's log line once the SuperNode connected
QUERY_DEF = "def query(msg: Message, context: Context) -> Message:\n"


def _evil_app(root: Path, marks: Path) -> tuple[Path, str]:
    """The installed app's FAB files with a few bytes added to clients/app.py; (folder, digest)."""
    with zipfile.ZipFile(io.BytesIO(installed_app_fab())) as archive:
        files = {n: archive.read(n) for n in archive.namelist() if not n.startswith(".info/")}
    source = files["clients/app.py"].decode()
    assert QUERY_DEF in source
    future = "from __future__ import annotations\n"
    assert future in source
    source = source.replace(future, future + EVIL_IMPORT.format(marks=str(marks)), 1)
    head, _, tail = source.partition(QUERY_DEF)
    evil = head + QUERY_DEF + EVIL_QUERY + tail
    files["clients/app.py"] = evil.encode()
    folder = root / "evilapp"
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder, app_digest(files)


def _site_files(root: Path, hospital: str) -> tuple[Path, Path]:
    folder = root / "data" / hospital
    folder.mkdir(parents=True)
    table = load_table("medpar")
    table[table["provnum"] == hospital].drop(columns=["provnum"]).to_csv(
        folder / "rows.csv", index=False
    )
    (folder / "schema.yaml").write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    return folder / "rows.csv", folder / "schema.yaml"


def _run_config(run_dir: Path, overrides: list[str]) -> str:
    """The run config `fedgov run` would send for these Hydra overrides."""
    from omegaconf import OmegaConf

    from fedgov.config import from_mapping, to_flower_config
    from fedgov.deploy import toml_value
    from simulations.run import compose_config

    composed = compose_config(overrides)
    cfg = from_mapping(OmegaConf.to_container(composed, resolve=True))  # type: ignore[arg-type]
    cfg.output_dir = str(run_dir)
    return " ".join(f"{k}={toml_value(v)}" for k, v in to_flower_config(cfg).items())


@pytest.mark.slow
def test_an_unapproved_app_runs_in_no_runtime_until_the_site_approves_it(tmp_path, processes):
    from server.coordinator import flower_environment, load_server_settings, write_flwr_connection

    link_port, *site_ports = free_ports(1 + len(RUNTIMES))
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    (coordinator / "server.yaml").write_text(
        yaml.safe_dump(
            {"federation": "hospitals", "host": "127.0.0.1", "port": link_port, "insecure": True}
        )
    )
    link = processes.start(
        "coordinator", [*FEDGOV, "server", "start", "--insecure"], cwd=coordinator
    )
    processes.wait_for_port(link, link_port, timeout=60)
    settings = load_server_settings(coordinator / "server.yaml")
    write_flwr_connection(settings, True)

    marks = tmp_path / "marks"
    marks.mkdir()
    evil_dir, evil_digest = _evil_app(tmp_path, marks)
    table = load_table("medpar")
    hospitals = list(table["provnum"].value_counts().index[: len(RUNTIMES)])
    folders: dict[str, Path] = {}
    for site, port, hospital in zip(RUNTIMES, site_ports, hospitals, strict=True):
        data, schema = _site_files(tmp_path, hospital)
        folder = tmp_path / "sites" / site
        made = fedgov(
            "site",
            "init",
            "--site-id",
            site,
            "--data",
            str(data),
            "--schema",
            str(schema),
            "--coordinator",
            f"127.0.0.1:{link_port}",
            "--port",
            str(port),
            "--out",
            str(folder),
            cwd=tmp_path,
        )
        assert made.returncode == 0, made.stderr
        folders[site] = folder
    # The approver's operator reviewed the FAB and approved its digest before the run.
    approved = fedgov(
        "site", "apps", "approve", evil_digest, "--comment", "reviewed", cwd=folders["approver"]
    )
    assert approved.returncode == 0, approved.stderr
    sites = [
        processes.start(site, [*FEDGOV, "site", "start", "--insecure", *flags], cwd=folders[site])
        for site, flags in RUNTIMES.items()
    ]
    for proc in sites:
        processes.wait_for_log(proc, NODE_ID, 120)  # connected: the run will ask every site
    flwr = str(Path(sys.executable).parent / "flwr")

    def run(name: str, num_sites: int) -> dict:
        run_dir = tmp_path / name
        config = _run_config(
            run_dir,
            [
                "dataset=medpar",
                f"federation.num_sites={num_sites}",
                "federation.min_sites_per_round=1",
                "rounds=1",
                "federation.round_timeout=180",
            ],
        )
        started = processes.start(
            name,
            [flwr, "run", str(evil_dir), "hospitals", "--run-config", config, "--stream"],
            env=flower_environment(settings),
            cwd=tmp_path,
        )
        processes.wait_until(
            lambda: (run_dir / "metrics.json").exists() or not started.running(),
            400,
            f"{name}'s metrics.json",
            must_keep_running=[link],
        )
        assert (run_dir / "metrics.json").exists(), processes.logs_report(60)
        processes.wait_for_exit(started, 60)
        return json.loads((run_dir / "metrics.json").read_text())

    # 1. The FAB runs at the site that approved it, and nowhere else, in no runtime.
    metrics = run("run-refused", 1)
    first = metrics["rounds"][0]
    attacked = [site for site in RUNTIMES if site != "approver"]
    assert first["participants"] == ["approver"], first
    assert sorted(first["refused"]) == sorted(attacked), first
    for site in attacked:
        assert first["refused"][site].startswith(f"site {site} refused app {evil_digest}")
    assert sorted(p.name for p in marks.iterdir()) == ["approver", "imported-approver"]
    assert "PRIVATE KEY" in (marks / "approver").read_text()  # what the FAB does where it runs
    for site in attacked:
        folder = folders[site]
        refusals = [e for e in AppLog(folder, site).entries() if e.event == REFUSE]
        assert [e.digest for e in refusals] == [evil_digest], site
        assert not list((folder / "flwr-home").glob("apps/*")), site  # never unpacked
        status = fedgov("site", "status", cwd=folder)
        assert f"refused app {evil_digest}" in status.stdout, status.stdout
        shown = fedgov("site", "apps", "show", evil_digest[:12], cwd=folder)
        assert shown.returncode == 0 and "~ clients/app.py" in shown.stdout, shown.stderr

    # 2. Approved by each site's operator, the same FAB runs there, in every runtime.
    for site in attacked:
        assert (
            fedgov("site", "apps", "approve", evil_digest[:12], cwd=folders[site]).returncode == 0
        )
    metrics = run("run-approved", len(RUNTIMES))
    second = metrics["rounds"][0]
    assert sorted(second["participants"]) == sorted(RUNTIMES) and second["refused"] == {}, second
    for site in attacked:
        assert "PRIVATE KEY" in (marks / site).read_text(), site
        assert (marks / f"imported-{site}").is_file(), site


# ---- (c) re-asking a released round with other settings ---------------------------------------


@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _dp_cfg(noise_multiplier: float, clip: float, batch: int):
    from fedgov.config import RunConfig

    cfg = RunConfig(rounds=3, seed=4)
    cfg.dataset.name, cfg.federation.num_sites = "synthetic", 3
    cfg.privacy.name, cfg.privacy.noise_multiplier = "sample_dp", noise_multiplier
    cfg.privacy.max_grad_norm = clip
    # One full-batch step (q = 1) without momentum: the update is lr·(S + σC·ξ)/n exactly.
    cfg.train.batch_size, cfg.train.local_epochs = batch, 1
    cfg.train.lr, cfg.train.momentum = 0.1, 0.0
    return cfg


def _ask(cfg, site_dir: Path, start, node: dict):
    """One train message, as a SuperNode hands it to the site's ClientApp; the reply."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from clients import app as client_app
    from fedgov import messages
    from fedgov.config import to_flower_config

    config = messages.train_config("run-x")
    config[messages.SERVER_ROUND] = 1
    message = Message(
        RecordDict({messages.CONFIG: config, messages.ARRAYS: start}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    message.metadata.__dict__["_message_id"] = "m-1"
    context = Context(
        run_id=5, node_id=7, node_config=node, state=RecordDict(), run_config=to_flower_config(cfg)
    )
    reply = client_app.train(message, context)
    assert messages.decline_reason(reply) is None, messages.decline_reason(reply)
    return reply


def _flat(arrays) -> np.ndarray:
    return np.concatenate([array.numpy().astype(np.float64).ravel() for array in arrays.values()])


def _clipped_sum(cfg, site, start, clip: float):
    """Σ_i clip_C(∇ℓ_i) at the start weights, computed record by record (independently of the
    site's fused clipper), and the largest per-record gradient norm."""
    import torch

    from clients.update import site_model

    model = site_model(cfg, site, start)
    total, largest = None, 0.0
    for x, y in zip(site.train.x, site.train.y, strict=True):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x[None])), torch.from_numpy(np.asarray([y]))
        )
        loss.backward()
        grad = np.concatenate([p.grad.double().numpy().ravel() for p in model.parameters()])
        norm = float(np.linalg.norm(grad))
        largest = max(largest, norm)
        clipped = grad * min(1.0, clip / norm)
        total = clipped if total is None else total + clipped
    return total, largest


@pytest.mark.parametrize(
    ("first", "second"),
    [((2.0, 50.0), (4.0, 50.0)), ((1.0, 50.0), (1.0, 100.0))],
    ids=["sigma-2-then-4", "clip-50-then-100"],
)
def test_a_round_re_asked_with_other_noise_or_clipping_gets_fresh_noise_and_a_new_spend(
    tmp_path, task_identity, first, second
):
    """The coordinator asks round 1 again with σ 4 after σ 2 (or C 100 after C 50). With the
    noise shared, the combination (σ₂·g₁ − σ₁·g₂)/(σ₂ − σ₁) (C alike) would be the exact clipped
    sum; with fresh noise it is off by the noise's own size, and the ledger holds both spends."""
    from clients.site_data import load_site_data
    from fedgov.models import initial_model
    from fedgov_data.federation import simulated_federation
    from privacy.accounting import epsilon
    from privacy.ledger import RELEASED, SiteLedger
    from privacy.receipts import PRIVATE_KEY_FILE

    site_dir = tmp_path / "site"
    node = {
        "partition-id": 0,
        "num-partitions": 3,
        "site-dir": str(site_dir),
        "epsilon-cap": 1000.0,
    }
    probe = _dp_cfg(*first, batch=1)
    site = load_site_data(probe, node)
    n = len(site.train.y)
    schema = simulated_federation(probe).pool.schema
    from flwr.app import ArrayRecord

    start = ArrayRecord(initial_model("mlp", schema.input_shape, 2, 64, 0).state_dict())
    w0 = _flat(start)
    released, noise_scales = [], []
    for sigma, clip in (first, second):
        cfg = _dp_cfg(sigma, clip, batch=n)
        reply = _ask(cfg, site_dir, start, node)
        from fedgov import messages

        w1 = _flat(reply.content.array_records[messages.ARRAYS])
        released.append(n * (w0 - w1) / cfg.train.lr)  # g = S + σC·ξ
        noise_scales.append(sigma * clip)
        exact, largest = _clipped_sum(cfg, site, start, clip)
        assert largest < 50.0  # no record is clipped: S is the same sum at C 50 and C 100
        noise = released[-1] - exact
        # Each release carries N(0, (σC)²) noise per coordinate around the exact clipped sum.
        assert np.sqrt(np.mean(noise**2)) == pytest.approx(sigma * clip, rel=0.15)
    (g1, g2), (s1, s2) = released, noise_scales
    # The shared-noise attack: (s2·g1 − s1·g2)/(s2 − s1) cancels the noise iff ξ₁ = ξ₂.
    recovered = (s2 * g1 - s1 * g2) / (s2 - s1)
    error = recovered - exact
    expected = s1 * s2 * np.sqrt(2.0) / (s2 - s1)  # std of (s2·s1ξ₁ − s1·s2ξ₂)/(s2 − s1)
    assert np.sqrt(np.mean(error**2)) == pytest.approx(expected, rel=0.15)
    assert abs(np.corrcoef(g1 - exact, g2 - exact)[0, 1]) < 0.1
    # Both releases are on the ledger, each a spend, composed.
    spends = SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE).read().spends
    assert [(s.round, s.status, s.noise_multiplier) for s in spends] == [
        (1, RELEASED, first[0]),
        (1, RELEASED, second[0]),
    ]
    assert spends[0].release_sha256 != spends[1].release_sha256
    assert spends[1].epsilon_after == pytest.approx(
        epsilon([s.entry for s in spends], 1e-5), rel=1e-9
    )
    # A byte-identical retry of the second request returns the same bytes and spends nothing.
    again = _ask(_dp_cfg(*second, batch=n), site_dir, start, node)
    from fedgov import messages

    assert np.array_equal(n * (w0 - _flat(again.content.array_records[messages.ARRAYS])) / 0.1, g2)
    assert len(SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE).read().spends) == 2


# ---- (b) run configs outside the site's policy -------------------------------------------------

POLICY = {
    "delta": 1e-5,
    "require_dp": True,
    "min_noise_multiplier": 0.8,
    "max_epsilon_per_run": 5.0,
    "max_rounds_per_run": 3,
    "max_local_epochs": 2,
    "report_eval_metrics": False,
}


def _policy_node(site_dir: Path, **changes) -> dict:
    from clients.site_policy import policy_from_yaml

    policy = policy_from_yaml({**POLICY, **changes}, "site.yaml")
    return {
        "partition-id": 0,
        "num-partitions": 3,
        "site-dir": str(site_dir),
        "epsilon-cap": 8.0,
        **policy.node_config(),
    }


def _policy_cfg(**changes):
    from fedgov.config import RunConfig

    cfg = RunConfig(rounds=3, seed=4)
    cfg.dataset.name, cfg.federation.num_sites = "synthetic", 3
    cfg.privacy.name, cfg.privacy.noise_multiplier = "sample_dp", 1.0
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        setattr(getattr(cfg, section), key, value) if key else setattr(cfg, section, value)
    return cfg


def _message(kind, start, server_round: int = 1):
    from flwr.app import Message, RecordDict

    from fedgov import messages

    config = messages.train_config("run-p")
    config[messages.SERVER_ROUND] = server_round
    message = Message(
        RecordDict({messages.CONFIG: config, messages.ARRAYS: start}),
        dst_node_id=7,
        message_type=kind,
    )
    message.metadata.__dict__["_message_id"] = f"m-{kind}-{server_round}"
    return message


def _start_arrays(cfg):
    from flwr.app import ArrayRecord

    from fedgov.models import initial_model
    from fedgov_data.federation import simulated_federation

    schema = simulated_federation(cfg).pool.schema
    return ArrayRecord(initial_model("mlp", schema.input_shape, 2, 64, 0).state_dict())


@pytest.mark.parametrize(
    ("changes", "node_changes", "server_round", "expected"),
    [
        (
            {"privacy__delta": 4.95e-4},
            {},
            1,
            "site policy delta: the run asks privacy.delta = 0.000495; this site's limit: "
            "δ = 1e-05",
        ),
        (
            {"privacy__name": "none"},
            {},
            1,
            "site policy require_dp: the run asks privacy.name = 'none'; this site's limit: "
            "sample-level DP",
        ),
        (
            {"rounds": 10},
            {},
            1,
            "site policy max_rounds_per_run: the run asks rounds = 10; this site's limit: 3 rounds",
        ),
        (
            {},
            {},
            4,
            "site policy max_rounds_per_run: the run asks round 4; this site's limit: 3 rounds",
        ),
        (
            {"train__local_epochs": 5},
            {},
            1,
            "site policy max_local_epochs: the run asks train.local_epochs = 5; this site's limit: "
            "2 epochs",
        ),
        (
            {},
            {"allowed_features": ["x00", "x01"]},
            1,
            "site policy allowed_features: the run asks column 'x02'; this site's limit: only x00, "
            "x01",
        ),
        (
            {"privacy__noise_multiplier": 0.5},
            {},
            1,
            "site policy min_noise_multiplier: the run asks σ = 0.5; this site's limit: σ ≥ 0.8",
        ),
        (
            {},
            {"require_secure_aggregation": True},
            1,
            "site policy require_secure_aggregation: the run asks an update in the clear",
        ),
        (
            {},
            {"max_epsilon_per_run": 1.0},
            1,
            "site policy max_epsilon_per_run: the run asks a round that brings this run to ε = ",
        ),
    ],
    ids=[
        "larger-delta",
        "no-dp",
        "more-rounds",
        "later-round",
        "more-epochs",
        "column",
        "less-noise",
        "in-the-clear",
        "run-epsilon",
    ],
)
def test_a_request_outside_the_site_policy_is_declined_before_training(
    tmp_path, task_identity, changes, node_changes, server_round, expected
):
    from flwr.app import Context, MessageType, RecordDict

    from clients import app as client_app
    from clients.site_data import load_site_data
    from fedgov import messages
    from fedgov.config import to_flower_config
    from privacy.ledger import SiteLedger
    from privacy.receipts import PRIVATE_KEY_FILE

    cfg = _policy_cfg(**changes)
    site_dir = tmp_path / "site"
    node = _policy_node(site_dir, **node_changes)
    if "allowed_features" in node_changes:  # the synthetic rows' columns: x00, x01, x02...
        assert load_site_data(cfg, node).schema.feature_names[:3] == ("x00", "x01", "x02")
    context = Context(
        run_id=5, node_id=7, node_config=node, state=RecordDict(), run_config=to_flower_config(cfg)
    )
    reply = client_app.train(_message(MessageType.TRAIN, _start_arrays(cfg), server_round), context)
    reason = messages.decline_reason(reply)
    assert reason is not None and reason.startswith(expected), reason
    assert messages.ARRAYS not in reply.content.array_records  # nothing released
    if (site_dir / "privacy_ledger.json").exists():  # nothing spent
        assert SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE).read().spends == []


def test_inside_the_policy_the_site_trains_and_accounts_at_its_own_delta(tmp_path, task_identity):
    """The same site trains a request inside its policy (its δ, not the run's smaller one, in
    every ε), and declines to report evaluation metrics when report_eval_metrics is off."""
    from flwr.app import Context, MessageType, RecordDict

    from clients import app as client_app
    from fedgov import messages
    from fedgov.config import to_flower_config
    from privacy.accounting import epsilon
    from privacy.receipts import Receipt

    cfg = _policy_cfg(privacy__delta=1e-7)  # a smaller δ than the site's: accepted, not used
    node = _policy_node(tmp_path / "site")
    context = Context(
        run_id=5, node_id=7, node_config=node, state=RecordDict(), run_config=to_flower_config(cfg)
    )
    start = _start_arrays(cfg)
    reply = client_app.train(_message(MessageType.TRAIN, start), context)
    assert messages.decline_reason(reply) is None, messages.decline_reason(reply)
    receipt = Receipt.from_record(reply.content.config_records[messages.RECEIPT]).payload
    assert receipt["delta"] == 1e-5
    entry = tuple(receipt["history"][0])
    assert receipt["epsilon"] == pytest.approx(epsilon([entry], 1e-5), rel=1e-9)
    evaluated = client_app.evaluate_global(_message(MessageType.EVALUATE, start), context)
    assert messages.decline_reason(evaluated).startswith("site policy report_eval_metrics")
    assert messages.METRICS not in evaluated.content.metric_records


def test_a_malformed_policy_in_site_yaml_is_one_line(tmp_path):
    from clients.daemon import load_site_settings
    from fedgov.errors import ConfigError

    for key, value, expected in [
        ("delta", 2, "delta must be in (0, 1)"),
        ("max_rounds_per_run", 2.5, "max_rounds_per_run must be a whole number > 0"),
        ("require_dp", "maybe", "require_dp must be true or false"),
        ("allowed_features", 3, "allowed_features must be a list of column names"),
    ]:
        path = tmp_path / f"{key}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "site_id": "a",
                    "coordinator": "h:1",
                    "data": "d.csv",
                    "schema": "s.yaml",
                    key: value,
                }
            )
        )
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_site_settings(path)


# ---- (d) a ledger rolled back or edited --------------------------------------------------------


def _train_round(cfg, node, start, server_round):
    from flwr.app import Context, MessageType, RecordDict

    from clients import app as client_app
    from fedgov.config import to_flower_config

    context = Context(
        run_id=5, node_id=7, node_config=node, state=RecordDict(), run_config=to_flower_config(cfg)
    )
    return client_app.train(_message(MessageType.TRAIN, start, server_round), context)


def _remove_first_spend_keep_checksum(path: Path) -> None:
    """What a careless or hostile edit does: drop a spend, recompute the SHA-256 checksum."""
    import hashlib

    data = json.loads(path.read_text())
    del data["spends"][0]
    body = {k: v for k, v in data.items() if k not in ("checksum", "signature")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    data["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(data))


def test_an_edited_ledger_and_an_older_copy_are_refused_until_an_explicit_restore(
    tmp_path, task_identity, capsys
):
    from fedgov import messages
    from fedgov_cli.main import main as fedgov_main
    from privacy.ledger import JOURNAL_FILE, LEDGER_FILE, SiteLedger
    from privacy.receipts import PRIVATE_KEY_FILE, Receipt

    cfg = _policy_cfg()
    site_dir = tmp_path / "site"
    node = {"partition-id": 0, "num-partitions": 3, "site-dir": str(site_dir), "epsilon-cap": 50.0}
    start = _start_arrays(cfg)
    ledger = SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE)
    receipts = []
    for server_round in (1, 2):
        reply = _train_round(cfg, node, start, server_round)
        assert messages.decline_reason(reply) is None, messages.decline_reason(reply)
        receipts.append(Receipt.from_record(reply.content.config_records[messages.RECEIPT]))
        if server_round == 1:
            backup = tmp_path / "backup-after-round-1.json"
            backup.write_bytes((site_dir / LEDGER_FILE).read_bytes())
    # Every receipt names the journalled ledger write its spend was reserved against.
    journal = {entry["seq"]: entry["sha256"] for entry in ledger.journal()}
    for receipt in receipts:
        assert journal[receipt.payload["ledger_seq"]] == receipt.payload["ledger_sha256"]
    assert receipts[1].payload["ledger_seq"] > receipts[0].payload["ledger_seq"]
    current = (site_dir / LEDGER_FILE).read_bytes()

    def declined(server_round: int) -> str:
        reply = _train_round(cfg, node, start, server_round)
        assert not reply.content.array_records  # nothing trained, nothing released
        reason = messages.decline_reason(reply)
        assert reason is not None and "failing closed" in reason
        return reason

    # (1) Spends removed, checksum recomputed: not signed by the site's key.
    _remove_first_spend_keep_checksum(site_dir / LEDGER_FILE)
    assert "not signed by this site's key" in declined(3)
    # (2) The older copy from the backup (signed, fewer spends): older than its journal.
    (site_dir / LEDGER_FILE).write_bytes(backup.read_bytes())
    assert "is an older copy" in declined(3)
    # (3) The ledger swapped back: the site trains on, and spends are as before the attack.
    (site_dir / LEDGER_FILE).write_bytes(current)
    assert [s.round for s in ledger.read().spends] == [1, 2]

    # (4) A legitimate restore is explicit and journalled; the site then accepts the backup.
    (site_dir / "site.yaml").write_text(
        yaml.safe_dump(
            {"site_id": "site-00", "coordinator": "h:1", "data": "d.csv", "schema": "s.yaml"}
        )
    )
    config = str(site_dir / "site.yaml")
    with pytest.raises(SystemExit):  # --reason is required
        fedgov_main(["site", "ledger", "restore", str(backup), "--config", config])
    capsys.readouterr()
    assert (
        fedgov_main(
            ["site", "ledger", "restore", str(backup), "--reason", "disk lost", "--config", config]
        )
        == 0
    )
    assert "ledger restored" in capsys.readouterr().out
    assert [s.round for s in ledger.read().spends] == [1]
    last = ledger.journal()[-1]
    assert last["event"] == "restore" and "disk lost" in last["reason"]
    assert (site_dir / JOURNAL_FILE).read_bytes().count(b"\n") == len(ledger.journal())
    reply = _train_round(cfg, node, start, 2)
    assert messages.decline_reason(reply) is None
