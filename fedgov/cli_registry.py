"""``fedgov registry ...`` and ``fedgov serve``: the governed model registry on the command line.

Added to the ``fedgov`` parser by :func:`add_commands`. Heavy imports (SQLAlchemy, torch,
FastAPI) happen inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedgov.errors import FedgovError

REF_HELP = "model reference: NAME:VERSION (e.g. randhie-mlp:3) or NAME@ALIAS (e.g. @production)"
EXPORT_FORMATS = ("onnx", "safetensors", "card", "manifest")
_EXPORT_ROLE = {"onnx": "onnx", "safetensors": "weights", "card": "model_card"}
_EXPORT_SUFFIX = {
    "onnx": ".onnx",
    "safetensors": ".safetensors",
    "card": ".md",
    "manifest": ".json",
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``registry`` (with its subcommands) and ``serve`` to the ``fedgov`` command parser."""
    from server.registry.registry import DB_ENV, POLICY_ENV, REGISTRY_ENV, default_registry_path

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        default=default_registry_path(),
        metavar="DIR",
        help=f"registry folder (default: ${REGISTRY_ENV} or ./.fedgov/registry; now %(default)s)",
    )
    common.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help=f"SQLAlchemy URL of the metadata database (default: ${DB_ENV} or SQLite in DIR), "
        "e.g. postgresql+psycopg://user@host/db",
    )
    common.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help=f"governance policy YAML (default: ${POLICY_ENV} or DIR/policy.yaml)",
    )

    registry = commands.add_parser(
        "registry",
        help="the governed model registry: list, show, verify, approve, promote, audit, export",
        description=(
            "Model versions published by federated runs: signed manifests, approvals by the "
            "policy's principals, aliases such as 'production' moved only when every gate holds, "
            "and a hash-chained audit log of every action."
        ),
    )
    sub = registry.add_subparsers(dest="registry_command", metavar="ACTION")
    registry.set_defaults(handler=_dispatch, registry_parser=registry)

    p = sub.add_parser("list", parents=[common], help="list model versions")
    p.add_argument("name", nargs="?", help="only this model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(registry_handler=_list)

    p = sub.add_parser(
        "show", parents=[common], help="a version's manifest, decisions, aliases and gates"
    )
    p.add_argument("ref", metavar="REF", help=REF_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(registry_handler=_show)

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check a version's signature, publisher and artifact hashes",
        description="Re-hash every artifact and check the manifest's Ed25519 signature (and, "
        "when a policy is found, that its signer is a publisher the policy lists).",
    )
    p.add_argument("ref", metavar="REF", help=REF_HELP)
    p.set_defaults(registry_handler=_verify)

    for decision, verb in (("approve", "approve"), ("reject", "reject")):
        p = sub.add_parser(
            decision,
            parents=[common],
            help=f"{verb} a version: sign its manifest digest with your key",
            description=f"Sign '{decision}' for the version's manifest digest with --key. The "
            "key must belong to a principal of the policy; your latest decision is the one that "
            "counts.",
        )
        p.add_argument("ref", metavar="REF", help=REF_HELP)
        p.add_argument("--key", required=True, metavar="K", help="your Ed25519 private key (PEM)")
        p.add_argument("--comment", default="", help="a note kept with the decision")
        p.set_defaults(registry_handler=_decide, decision=decision)

    p = sub.add_parser(
        "promote",
        parents=[common],
        help="move an alias (e.g. production) to a version when every gate holds",
        description="Point --alias at the version when every gate of the policy holds (quorum, "
        "required roles, no standing rejection, promoter role, ε, metrics, secure aggregation); "
        "otherwise name each unmet gate. Moving an alias back to an older version is a rollback.",
    )
    p.add_argument("ref", metavar="REF", help="NAME:VERSION to promote")
    p.add_argument("--alias", required=True, help="the alias to move, e.g. production")
    p.add_argument("--key", required=True, metavar="K", help="the promoter's private key (PEM)")
    p.set_defaults(registry_handler=_promote)

    p = sub.add_parser(
        "audit",
        parents=[common],
        help="the hash-chained audit log (--verify checks it)",
        description="List the audit log; --verify checks every hash, link and signature, the "
        "recorded head, and that every version, decision and alias has its entry.",
    )
    p.add_argument("--verify", action="store_true", help="verify the chain; non-zero exit if not")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--last", type=int, default=0, metavar="N", help="only the last N entries")
    p.set_defaults(registry_handler=_audit)

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a version's ONNX file, weights, model card or signed manifest",
        description="Verify the artifact's sha256 against the signed manifest, then write it.",
    )
    p.add_argument("ref", metavar="REF", help=REF_HELP)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="export_format")
    p.add_argument("--out", default=None, help="output file (default: NAME-VERSION.<suffix>)")
    p.set_defaults(registry_handler=_export)

    p = sub.add_parser(
        "keygen",
        help="create an Ed25519 key pair for a principal",
        description="Write a private key (PEM, mode 0600) to PATH and its public key to PATH.pub; "
        "print the public key to put in the policy.",
    )
    p.add_argument("path", metavar="PATH", help="where to write the private key")
    p.set_defaults(registry_handler=_keygen)

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve NAME@ALIAS over HTTP after verifying it",
        description="Verify the version behind NAME@ALIAS (manifest signature, artifact hashes, "
        "approvals against the policy, audit chain), refuse to start on any failure, then serve "
        "GET /healthz, GET /v1/model, POST /v1/predict, GET /metrics and the OpenAPI schema.",
    )
    serve.add_argument("ref", metavar="NAME@ALIAS", help="e.g. randhie-mlp@production")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port", type=_port, default=8080, help="port, 0 = any free one (default: %(default)s)"
    )
    serve.add_argument(
        "--runtime",
        choices=("onnx", "torch"),
        default="onnx",
        help="onnx (ONNX Runtime on the ONNX artifact) or torch (the safetensors weights)",
    )
    serve.set_defaults(handler=_serve)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got '{text}'") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value}")
    return value


def _dispatch(args: argparse.Namespace) -> int:
    handler = getattr(args, "registry_handler", None)
    if handler is None:
        args.registry_parser.print_help()
        return 2
    return handler(args)


# ---- handlers -----------------------------------------------------------------------------------


def _open(args: argparse.Namespace):
    from server.registry.registry import Registry

    return Registry(args.registry, args.db)


def _ref(text: str, **kwargs: bool):
    from server.registry.manifest import parse_ref

    return parse_ref(text, **kwargs)


def _list(args: argparse.Namespace) -> int:
    from server.registry.governance import version_status
    from server.registry.manifest import final_metric, privacy_epsilon

    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    rows = []
    with registry.store.read() as session:
        for record in registry.store.versions(session, args.name):
            status = version_status(registry, session, record, policy)
            latest = {d["principal"]: d["decision"] for d in status["decisions"]}
            rows.append(
                {
                    "name": record.name,
                    "version": record.version,
                    "created_at": record.created_at,
                    "aliases": status["aliases"],
                    "approvals": sorted(p for p, d in latest.items() if d == "approve"),
                    "rejections": sorted(p for p, d in latest.items() if d == "reject"),
                    "epsilon": privacy_epsilon(record.manifest.get("privacy_report")),
                    "central_eval_accuracy": final_metric(record.manifest, "central_eval_accuracy"),
                    "eval_accuracy": final_metric(record.manifest, "eval_accuracy"),
                    "manifest_sha256": record.manifest_sha256,
                    "run_id": record.run_id,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no model versions" + (f" of '{args.name}'" if args.name else ""))
        return 0
    header = ("version", "created (UTC)", "aliases", "approved by", "rejected by", "ε", "accuracy")
    table = [
        (
            f"{r['name']}:{r['version']}",
            r["created_at"][:19].replace("T", " "),
            ", ".join("@" + a for a in r["aliases"]) or "-",
            ", ".join(r["approvals"]) or "-",
            ", ".join(r["rejections"]) or "-",
            "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}",
            _fmt(
                r["central_eval_accuracy"]
                if r["central_eval_accuracy"] is not None
                else r["eval_accuracy"]
            ),
        )
        for r in rows
    ]
    _print_table(header, table)
    return 0


def _show(args: argparse.Namespace) -> int:
    from server.registry.governance import version_status
    from server.registry.manifest import privacy_summary

    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    with registry.store.read() as session:
        record = registry.store.resolve(session, _ref(args.ref))
        status = version_status(registry, session, record, policy)
    m = record.manifest
    if args.json:
        print(
            json.dumps(
                {
                    "name": record.name,
                    "version": record.version,
                    "manifest_sha256": record.manifest_sha256,
                    "signature": record.signature,
                    "signer_key": record.signer_key,
                    "manifest": m,
                    **status,
                },
                indent=2,
            )
        )
        return 0
    lineage = m["lineage"]
    schema = m["input_schema"]
    privacy = privacy_summary(m.get("privacy_report"))
    secagg = (lineage.get("secure_aggregation") or {}).get("enabled")
    out = [
        f"{record.ref}" + "".join(f"  @{a}" for a in status["aliases"]),
        f"  created           {record.created_at}",
        f"  manifest sha256   {record.manifest_sha256}",
        f"  signed by key     {m['publisher']['key_id']}"
        + (f" ({p.name})" if policy and (p := policy.principal_for_key(record.signer_key)) else ""),
        f"  model             {m['model']['architecture']} "
        f"({m['model']['parameters']:,} parameters)",
        f"  input             {schema['kind']} {schema['input_shape']} from {schema['dataset']}; "
        f"classes {', '.join(schema['classes'])}",
        f"  run               {lineage['run_id']}: {lineage['strategy']}, "
        f"{lineage['rounds_completed']}/{lineage['rounds']} rounds, {len(lineage['sites'])} sites, "
        f"secure aggregation {'on' if secagg else 'off'}, commit "
        f"{(lineage.get('code_commit') or 'unknown')[:12]}",
        "  metrics           "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted((m["metrics"].get("final") or {}).items())),
        "  privacy           "
        + (
            f"ε {_fmt(privacy['epsilon'])} at δ {privacy['delta']} (site-level "
            f"{_fmt(privacy['site_level_epsilon'])}, sample-level max "
            f"{_fmt(privacy['sample_level_max_epsilon'])})"
            if privacy["report"]
            else "no privacy report"
        ),
        "  artifacts",
    ]
    for role, a in sorted(m["artifacts"].items()):
        out.append(f"    {role:<12} {a['sha256']}  {a['bytes']:>10,} bytes  {a['filename']}")
    out.append("  decisions" + ("" if status["decisions"] else "         none yet"))
    for d in status["decisions"]:
        note = f" — {d['comment']}" if d["comment"] else ""
        out.append(
            f"    {d['at'][:19].replace('T', ' ')}  {d['decision']:<8} {d['principal']}{note}"
        )
    for reason in status.get("ignored_decisions", []):
        out.append(f"    ignored: {reason}")
    if policy is None:
        out.append("  gates             (no policy found: pass --policy FILE)")
    for alias, gates in (status.get("gates") or {}).items():
        verdict = "all gates hold" if gates["passed"] else "blocked"
        out.append(f"  gates @{alias:<10} {verdict}")
        for g in gates["results"]:
            out.append(f"    {'ok  ' if g['passed'] else 'FAIL'} {g['gate']}: {g['detail']}")
    print("\n".join(out))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from server.registry.errors import VerificationError
    from server.registry.governance import resolve, verify_version

    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    record = resolve(registry, _ref(args.ref))
    report = verify_version(registry, record, policy)
    for check in report.checks:
        print(check)
    if policy is None:
        print("note: no policy found, so the signer was not checked against a list of publishers")
    failed = report.first_failure()
    if failed is not None:
        raise VerificationError(f"verify {record.ref} failed: {failed.what}: {failed.detail}")
    print(f"{record.ref} verified")
    return 0


def _decide(args: argparse.Namespace) -> int:
    from server.registry.governance import decide
    from server.registry.signing import load_key

    key = load_key(args.key)
    registry = _open(args)
    policy = registry.load_policy(args.policy)
    record, principal = decide(
        registry, _ref(args.ref), args.decision, key, policy, comment=args.comment
    )
    verb = "approved" if args.decision == "approve" else "rejected"
    print(
        f"{record.ref} {verb} by {principal} (key {key.key_id}); signed manifest sha256 "
        f"{record.manifest_sha256[:16]}…"
    )
    return 0


def _promote(args: argparse.Namespace) -> int:
    from server.registry.governance import promote
    from server.registry.signing import load_key

    key = load_key(args.key)
    registry = _open(args)
    policy = registry.load_policy(args.policy)
    ref = _ref(args.ref, allow_alias=False)
    promotion = promote(registry, ref, args.alias, key, policy)
    record = promotion.record
    if promotion.previous_version is None:
        moved = "was unset"
    elif promotion.rollback:
        moved = f"rolled back from version {promotion.previous_version}"
    else:
        moved = f"was version {promotion.previous_version}"
    print(f"{record.name}@{args.alias} → {record.ref} by {promotion.promoter} ({moved})")
    for gate in promotion.report.results:
        print(f"  ok   {gate.gate}: {gate.detail}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from server.registry.errors import VerificationError
    from server.registry.governance import verify_audit

    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    report = verify_audit(registry)
    entries = report.entries[-args.last :] if args.last > 0 else report.entries
    if args.json:
        data: dict[str, Any] = {
            "entries": [e.as_dict() for e in entries],
            "head": {"seq": report.head[0], "hash": report.head[1]},
        }
        if args.verify:
            data["problems"] = report.problems
        print(json.dumps(data, indent=2))
    else:
        header = ("seq", "at (UTC)", "action", "subject", "actor", "key", "hash")
        rows = []
        for e in entries:
            known = policy.principal_for_key(e.actor_key) if policy else None
            actor = known.name if known else e.actor + (" (key not in policy)" if policy else "")
            rows.append(
                (
                    str(e.seq),
                    e.at[:19].replace("T", " "),
                    e.action,
                    e.subject,
                    actor,
                    e.as_dict()["actor_key_id"],
                    e.entry_hash[:16],
                )
            )
        _print_table(header, rows)
    if args.verify:
        if not report.ok:
            if not args.json:
                for problem in report.problems:
                    print(f"FAIL {problem}")
            more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
            raise VerificationError(f"audit log verification failed: {report.problems[0]}{more}")
        if not args.json:
            print(
                f"audit chain intact: {len(report.entries)} entries, head {report.head[1]} "
                "(record this hash elsewhere to detect a rewrite of the whole log)"
            )
    return 0


def _export(args: argparse.Namespace) -> int:
    from server.registry.governance import resolve, verify_version
    from server.registry.manifest import canonical_json

    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    record = resolve(registry, _ref(args.ref))
    verify_version(registry, record, policy).raise_for_failure("export refused: ")
    fmt = args.export_format
    if fmt == "manifest":
        payload = canonical_json(
            {
                "manifest": record.manifest,
                "manifest_sha256": record.manifest_sha256,
                "signature": record.signature,
                "signer_key": record.signer_key,
            }
        )
    else:
        artifact = record.manifest["artifacts"][_EXPORT_ROLE[fmt]]
        payload = registry.artifacts.read_verified(artifact["sha256"], f"artifact {fmt}")
    out = Path(args.out or f"{record.name}-{record.version}{_EXPORT_SUFFIX[fmt]}")
    if out.is_dir():
        raise FedgovError(f"--out: {out} is a folder; give a file path")
    from fedgov.records import atomic_write_bytes

    atomic_write_bytes(out, payload)
    print(f"wrote {out} ({len(payload):,} bytes, {fmt} of {record.ref}, sha256 verified)")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from server.registry.signing import generate_key, public_path, write_key

    key = generate_key()
    write_key(args.path, key)
    print(f"private key {args.path} (keep it secret), public key {public_path(args.path)}")
    print(f"public_key: {key.public_key}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.serving import serve

    serve(
        args.ref,
        registry_path=args.registry,
        db_url=args.db,
        policy_path=args.policy,
        host=args.host,
        port=args.port,
        runtime=args.runtime,
    )
    return 0


# ---- output -------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    sys.stdout.write(line.format(*header).rstrip() + "\n")
    for row in rows:
        sys.stdout.write(line.format(*row).rstrip() + "\n")
    sys.stdout.flush()
