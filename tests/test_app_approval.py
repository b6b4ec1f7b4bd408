"""App approval at the site: the app digest, the signed append-only log, the ClientApp guard and
``fedgov site apps``. The real SuperLink/SuperNode attack is in tests/test_malicious_coordinator.py.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, MessageType, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from clients import app_guard
from clients.app_approval import (
    APPROVE,
    REFUSE,
    REVOKE,
    AppLog,
    AppLogError,
    AppRefused,
    app_digest,
    copy_project,
    diff_files,
    fab_app_digest,
    installed_app_fab,
    refuse_unapproved_app,
)
from clients.daemon import init_site
from fedgov import messages as keys
from fedgov_cli.main import main as fedgov_main
from privacy.receipts import PRIVATE_KEY_FILE, create_site_key


def _fab(
    files: dict[str, bytes],
    order: list[str] | None = None,
    stamp=(2024, 10, 1, 0, 0, 0),
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name in order or sorted(files):
            archive.writestr(zipfile.ZipInfo(name, stamp), files[name])
        archive.writestr(zipfile.ZipInfo(".info/CONTENT", stamp), "anything")
    return buffer.getvalue()


FILES = {
    "pyproject.toml": b"[project]\nname = 'app'\n",
    "clients/app.py": b"print('hello')\n",
    "fedgov/__init__.py": b"",
}

paths = st.text("abcdefghij/_.", min_size=1, max_size=12).filter(
    lambda p: not p.startswith((".info/", "/")) and not p.endswith("/") and "//" not in p
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(paths, st.binary(max_size=40), min_size=1, max_size=6), st.randoms())
def test_the_digest_names_the_files_not_the_zip(files, rng):
    order = list(files)
    rng.shuffle(order)
    a = _fab(files)
    b = _fab(files, order, stamp=(2020, 1, 2, 3, 4, 6), compression=zipfile.ZIP_STORED)
    assert fab_app_digest(a) == fab_app_digest(b) == app_digest(files)
    # One byte more in any one file, or one file renamed, is another app.
    name = sorted(files)[0]
    assert app_digest({**files, name: files[name] + b"\0"}) != app_digest(files)
    renamed = {(k + "x" if k == name else k): v for k, v in files.items()}
    assert app_digest(renamed) != app_digest(files)


def test_the_installed_app_digest_is_flowers_fab_of_the_project(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from fedgov.project import app_dir

    built = installed_app_fab()
    assert built == build_fab_from_disk(app_dir())  # byte for byte what `flwr run` ships
    # `fedgov run` runs `flwr run` on a copy of the project's files: the same FAB
    assert build_fab_from_disk(copy_project(app_dir(), tmp_path / "app")) == built
    assert "clients/app.py" in zipfile.ZipFile(io.BytesIO(built)).namelist()


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    create_site_key(site)
    return site


def test_the_log_replays_approvals_and_revocations(tmp_path):
    site = _site(tmp_path)
    log = AppLog(site, "hosp-a")
    a, b = "a" * 64, "b" * 64
    log.append(APPROVE, a, comment="first")
    log.append(APPROVE, b)
    log.append(REFUSE, "c" * 64, run="7")
    log.append(REVOKE, a)
    entries = log.entries()
    assert [(e.seq, e.event) for e in entries] == [
        (1, APPROVE),
        (2, APPROVE),
        (3, REFUSE),
        (4, REVOKE),
    ]
    assert list(log.approved()) == [b]
    assert entries[0].comment == "first" and entries[2].run == "7"


def _lines(log: AppLog) -> list[bytes]:
    return log.path.read_bytes().splitlines()


@pytest.mark.parametrize("edit", ["change", "remove", "swap", "foreign"])
def test_an_edited_log_is_refused_and_then_no_app_runs(tmp_path, edit):
    site = _site(tmp_path)
    log = AppLog(site, "hosp-a")
    fab = _fab(FILES)
    digest = fab_app_digest(fab)
    log.append(APPROVE, "a" * 64)
    log.append(REVOKE, "a" * 64)
    log.append(APPROVE, digest)
    assert refuse_unapproved_app(site, "hosp-a", fab) == digest
    lines = _lines(log)
    if edit == "change":  # the revocation turned back into an approval, signature kept
        lines[1] = lines[1].replace(b'"revoke"', b'"approve"')
    elif edit == "remove":  # the revocation removed
        del lines[1]
    elif edit == "swap":
        lines[0], lines[1] = lines[1], lines[0]
    else:  # a line re-signed by a key that is not the site's
        other = Ed25519PrivateKey.generate()
        entry = json.loads(lines[1])["entry"]
        from privacy.receipts import canonical_json

        lines[1] = json.dumps(
            {"entry": entry, "signature": other.sign(canonical_json(entry)).hex()}
        ).encode()
    log.path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(AppLogError):
        log.entries()
    with pytest.raises(AppRefused, match="app log cannot be trusted"):
        refuse_unapproved_app(site, "hosp-a", fab)


def test_an_unapproved_fab_is_refused_logged_once_per_run_and_kept_unpacked_nowhere(tmp_path):
    site = _site(tmp_path)
    approved = _fab(FILES)
    AppLog(site, "hosp-a").append(APPROVE, fab_app_digest(approved))
    evil_files = {**FILES, "clients/app.py": FILES["clients/app.py"] + b"open('x','w')\n"}
    evil = _fab(evil_files)
    for _ in range(2):
        with pytest.raises(AppRefused) as refused:
            refuse_unapproved_app(site, "hosp-a", evil, run="42")
    assert refused.value.digest == app_digest(evil_files)
    assert "site hosp-a refused app " + app_digest(evil_files) in str(refused.value)
    log = AppLog(site, "hosp-a")
    refusals = [e for e in log.entries() if e.event == REFUSE]
    assert [(e.digest, e.run) for e in refusals] == [(app_digest(evil_files), "42")]
    assert log.stored_fab(app_digest(evil_files)[:12]) == (app_digest(evil_files), evil)
    # What the operator reviews: exactly the few bytes that differ.
    diff = diff_files(FILES, evil_files)
    assert diff[0] == "~ clients/app.py" and "+open('x','w')" in diff
    # The verdict is cached per FAB (content-addressed): the cache names the same digest.
    cached = list((site / "apps" / "verified").iterdir())
    assert [p.read_text() for p in cached] == [app_digest(evil_files)]


def test_the_guard_refuses_before_flower_unpacks_and_replies_with_a_decline(tmp_path, monkeypatch):
    """Flower's own run_clientapp names, rebound by the guard: a refused FAB is not installed,
    the loader imports nothing, and the reply names the site and the app digest."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    assert app_guard.guard_problems() == []
    site = _site(tmp_path)
    AppLog(site, "hosp-a").append(APPROVE, fab_app_digest(_fab(FILES)))
    evil = _fab({**FILES, "clients/app.py": b"raise SystemExit('ran')\n"})
    for name in app_guard.GUARDED_NAMES:  # restored after the test
        monkeypatch.setattr(runtime, name, getattr(runtime, name))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    context = Context(
        run_id=5,
        node_id=9,
        node_config={"site-dir": str(site), "site-id": "hosp-a"},
        state=RecordDict(),
        run_config={},
    )
    run = Run.create_empty(5)
    monkeypatch.setattr(
        runtime, "pull_task_input", lambda client: (None, context, run, Fab("0" * 64, evil, {}))
    )  # the SuperNode's answer
    guard = app_guard.install_app_guard()
    _, _, _, fab = runtime.pull_task_input(object())
    assert runtime.install_from_fab(fab.content, skip_prompt=True) is None
    assert not (tmp_path / "flwr-home").exists()  # nothing unpacked
    refusing = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        "x", "1", fab.hash_str
    )
    assert refusing is guard.refusal
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 5), ("_node_id", 9)):
        monkeypatch.setattr(TaskIdentity, name, value)  # as Flower's pull sets them
    asked = Message(RecordDict(), dst_node_id=9, message_type=MessageType.QUERY)
    reply = refusing(asked, context)
    reason = keys.decline_reason(reply)
    assert reason is not None
    assert reason.startswith("site hosp-a refused app " + fab_app_digest(evil))
    assert keys.reply_site_id(reply) == "hosp-a"
    status = json.loads((site / "activity.json").read_text())
    assert status["outcome"] == "refused" and fab_app_digest(evil) in status["reason"]


def test_site_init_approves_the_installed_app_and_the_cli_reviews_approves_and_revokes(
    tmp_path, capsys
):
    config, _ = init_site(
        tmp_path / "site", "hosp-a", tmp_path / "d.csv", tmp_path / "s.yaml", "127.0.0.1:9092"
    )
    site = config.parent
    installed = fab_app_digest(installed_app_fab())
    assert list(AppLog(site, "hosp-a").approved()) == [installed]
    assert (site / PRIVATE_KEY_FILE).is_file()

    with zipfile.ZipFile(io.BytesIO(installed_app_fab())) as archive:
        files = {n: archive.read(n) for n in archive.namelist() if not n.startswith(".info/")}
    files["clients/app.py"] += b"# three\n"
    evil = _fab(files)
    with pytest.raises(AppRefused):
        refuse_unapproved_app(site, "hosp-a", evil, run="1")
    evil_digest = app_digest(files)

    def cli(*args: str) -> tuple[int, str, str]:
        code = fedgov_main(["site", "apps", *args, "--config", str(config)])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = cli("list")
    assert code == 0 and f"approved {installed}" in out and f"refused  {evil_digest}" in out
    code, out, _ = cli("show", evil_digest[:10])
    assert code == 0 and f"app {evil_digest} (not approved)" in out
    assert "~ clients/app.py" in out and "+# three" in out
    code, out, _ = cli("approve", evil_digest[:10], "--comment", "reviewed")
    assert code == 0 and f"approved app {evil_digest}" in out
    assert refuse_unapproved_app(site, "hosp-a", evil) == evil_digest
    code, out, _ = cli("revoke", evil_digest)
    assert code == 0
    with pytest.raises(AppRefused):
        refuse_unapproved_app(site, "hosp-a", evil)
    code, _, err = cli("revoke", evil_digest)
    expected = f"app {evil_digest} is not approved at site hosp-a"
    assert code != 0 and err.strip().splitlines()[-1].endswith(expected)
    code, _, err = cli("approve", "zz")
    assert code != 0 and "expected a 64-hex-digit app digest" in err
    events = [e.event for e in AppLog(site, "hosp-a").entries()]
    assert events == [APPROVE, REFUSE, APPROVE, REVOKE, REFUSE]


def test_the_shim_runs_the_guarded_clientapp(tmp_path):
    folder = app_guard.write_clientapp_shim(tmp_path)
    shim = folder / "flwr-clientapp"
    assert shim.stat().st_mode & 0o111
    assert "from clients.app_guard import guarded_clientapp" in shim.read_text()
