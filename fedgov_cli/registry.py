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
    common = _common_options()
    registry = commands.add_parser(
        "registry",
        help="the governed model registry: init, policy, list, show, verify, approve, promote, "
        "audit, checkpoint, export",
        description=(
            "Model versions published by federated runs: signed manifests, approvals by the "
            "policy's principals, aliases such as 'production' moved only when every gate holds, "
            "a hash-chained audit log of every action, and the policy itself as a chain of "
            "versions signed by its governance quorum."
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
    p.add_argument(
        "--anchor",
        default=None,
        metavar="FILE",
        help="a checkpoint (fedgov registry checkpoint) the log must extend (default: "
        "$FEDGOV_AUDIT_ANCHOR); with --verify",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--last", type=int, default=0, metavar="N", help="only the last N entries")
    p.set_defaults(registry_handler=_audit)

    p = sub.add_parser(
        "checkpoint",
        parents=[common],
        help="sign a checkpoint of the audit log's head, to keep outside the registry",
        description="Verify the whole audit log, then write a checkpoint (sequence number, head "
        "hash, policy version and digest, time) signed with --key (a principal of the policy). "
        "Keep it elsewhere: `audit --verify --anchor FILE` and `serve --anchor FILE` prove the "
        "log still extends it (no truncation, rewrite or fork).",
    )
    p.add_argument("--key", required=True, metavar="K", help="a principal's private key (PEM)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the checkpoint")
    p.set_defaults(registry_handler=_checkpoint)

    p = sub.add_parser(
        "init",
        parents=[common],
        help="govern a registry: apply policy version 1, signed by its governance quorum",
        description="Make POLICY (a policy YAML, or a version-1 proposal already signed with "
        "`policy sign`) the registry's first signed policy version. Each --key adds its "
        "principal's signature; together they must meet the policy's own governance quorum. "
        "Versions published before are adopted (their publisher must be in the policy).",
    )
    p.add_argument("policy_file", metavar="POLICY", help="policy YAML or signed proposal")
    p.add_argument(
        "--key", action="append", default=[], metavar="K", help="a governance signer's key"
    )
    p.set_defaults(registry_handler=_init)

    _add_policy_commands(sub, common)

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

    _add_serve_command(commands, common)


def _common_options() -> argparse.ArgumentParser:
    """``--registry``, ``--db`` and ``--policy``, shared by every registry command and serve."""
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
    return common


def _add_policy_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``fedgov registry policy propose|sign|apply|show|history``."""
    policy = sub.add_parser(
        "policy",
        help="the governed policy: propose, sign, apply, show, history",
        description="The policy is a chain of signed versions; a new version takes effect only "
        "with the signatures the current version's governance rule requires.",
    )
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="ACTION")
    policy.set_defaults(registry_handler=_policy_dispatch, policy_parser=policy)
    p = policy_sub.add_parser(
        "propose", parents=[common], help="write an unsigned proposal of the next version"
    )
    p.add_argument("policy_file", metavar="POLICY", help="the new policy (YAML)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the proposal")
    p.set_defaults(policy_handler=_policy_propose)
    p = policy_sub.add_parser(
        "sign", parents=[common], help="add your signature to a proposal (in place)"
    )
    p.add_argument("proposal", metavar="PROPOSAL")
    p.add_argument("--key", required=True, metavar="K", help="your private key (PEM)")
    p.set_defaults(policy_handler=_policy_sign)
    p = policy_sub.add_parser(
        "apply", parents=[common], help="make a signed proposal the policy in force"
    )
    p.add_argument("proposal", metavar="PROPOSAL")
    p.add_argument(
        "--key", required=True, metavar="K", help="a signer's key (signs the audit entry)"
    )
    p.set_defaults(policy_handler=_policy_apply)
    p = policy_sub.add_parser("show", parents=[common], help="print a policy version (the head)")
    p.add_argument("--version", type=int, default=0, metavar="N", help="this version")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(policy_handler=_policy_show)
    p = policy_sub.add_parser(
        "history", parents=[common], help="every applied version and who signed it"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(policy_handler=_policy_history)


def _add_serve_command(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """``fedgov serve NAME@ALIAS``."""
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
    serve.add_argument(
        "--anchor",
        default=None,
        metavar="FILE",
        help="a checkpoint the audit log must extend, at start and at every re-verification "
        "(default: $FEDGOV_AUDIT_ANCHOR)",
    )
    serve.add_argument(
        "--reverify-seconds",
        type=_positive_seconds,
        default=30.0,
        metavar="S",
        help="re-verify the alias, approvals, artifacts and audit log every S seconds; a "
        "failure stops predictions and /healthz says why (default: %(default)s)",
    )
    serve.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="bearer tokens, one per line: 'SCOPES TOKEN' with SCOPES a comma list of api "
        "(/v1/*), metrics (/metrics), docs (/docs, /openapi.json); without it nothing needs a "
        "token",
    )
    serve.add_argument(
        "--public",
        default="",
        metavar="SCOPES",
        help="with --token-file: scopes served without a token (e.g. metrics,docs)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=4 * 1024 * 1024,
        metavar="N",
        help="larger request bodies get 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--key",
        default=None,
        metavar="K",
        help="a principal's key: record this serve start in the audit log, signed with it",
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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got '{text}'") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got '{text}'")
    return int(text)


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

    ref = _ref(args.ref)  # a bad reference is named before anything is opened
    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    with registry.store.read() as session:
        record = registry.store.resolve(session, ref)
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
        out.append("  gates             (no policy yet: fedgov registry init POLICY --key K ...)")
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

    ref = _ref(args.ref)
    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    record = resolve(registry, ref)
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

    ref = _ref(args.ref)
    key = load_key(args.key)
    registry = _open(args)
    policy = registry.load_policy(args.policy)
    record, principal = decide(registry, ref, args.decision, key, policy, comment=args.comment)
    verb = "approved" if args.decision == "approve" else "rejected"
    print(
        f"{record.ref} {verb} by {principal} (key {key.key_id}); signed manifest sha256 "
        f"{record.manifest_sha256[:16]}…"
    )
    return 0


def _promote(args: argparse.Namespace) -> int:
    from server.registry.governance import promote
    from server.registry.signing import load_key

    ref = _ref(args.ref, allow_alias=False)
    key = load_key(args.key)
    registry = _open(args)
    policy = registry.load_policy(args.policy)
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


def _anchor(explicit: str | None):
    """The checkpoint named by ``explicit`` or ``$FEDGOV_AUDIT_ANCHOR``, or None."""
    import os

    from server.registry.checkpoint import ANCHOR_ENV, read_checkpoint

    path = explicit or os.environ.get(ANCHOR_ENV)
    return read_checkpoint(path, "--anchor" if explicit else f"${ANCHOR_ENV}") if path else None


def _audit(args: argparse.Namespace) -> int:
    from server.registry.errors import VerificationError
    from server.registry.governance import verify_audit

    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    anchor = _anchor(args.anchor) if args.verify else None
    report = verify_audit(registry, anchor)
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
            governed = (
                f", every entry signed by its principal under policy version "
                f"{report.state.policies.head.version} or earlier"
                if report.governed
                else " (no policy yet: keys are not bound to principals)"
            )
            print(f"audit chain intact: {len(report.entries)} entries{governed}")
            if anchor is not None:
                print(
                    f"extends checkpoint {anchor.seq} ({anchor.head_hash[:16]}…) by {anchor.signer}"
                )
            else:
                print(
                    f"head {report.head[1]} (make a signed checkpoint with `fedgov registry "
                    "checkpoint` and keep it elsewhere to detect truncation or a rewrite)"
                )
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    from server.registry.checkpoint import write_checkpoint
    from server.registry.governance import checkpoint
    from server.registry.signing import load_key

    key = load_key(args.key)
    registry = _open(args)
    made = checkpoint(registry, key)
    write_checkpoint(args.out, made)
    print(
        f"wrote {args.out}: checkpoint of entry {made.seq} (hash {made.head_hash}), policy "
        f"version {made.policy_version}, signed by {made.signer}; keep it outside the registry"
    )
    return 0


def _read_policy_mapping(path: str) -> Any:
    import yaml

    from server.registry.errors import PolicyError

    try:
        return yaml.safe_load(Path(path).read_bytes())
    except FileNotFoundError:
        raise PolicyError(f"policy: {path} does not exist") from None
    except OSError as error:
        raise PolicyError(f"policy: {path} cannot be read ({error.strerror})") from None
    except yaml.YAMLError:
        raise PolicyError(f"policy: {path} is not valid YAML") from None


def _init(args: argparse.Namespace) -> int:
    from server.registry.errors import PolicyError
    from server.registry.governance import apply_policy, propose_policy
    from server.registry.policy_chain import POLICY_FORMAT, version_from_mapping
    from server.registry.registry import Registry
    from server.registry.signing import load_key

    keys = [load_key(path) for path in args.key]
    if not keys:
        raise PolicyError("init: give the governance signers' keys with --key K (one per signer)")
    registry = Registry(args.registry, args.db, create=True)
    chain = registry.policy_chain()
    if chain:
        raise PolicyError(
            f"init refused: {registry.path} already has policy version {chain.head.version}; "
            "change it with `fedgov registry policy propose`"
        )
    data = _read_policy_mapping(args.policy_file)
    if isinstance(data, dict) and data.get("format") == POLICY_FORMAT:
        version = version_from_mapping(data, args.policy_file)
    else:
        version = propose_policy(registry, data, args.policy_file)
    policy = version.parsed(args.policy_file)
    for key in keys:
        principal = policy.principal_for_key(key.public_key)
        if principal is None:
            raise PolicyError(f"--key: key {key.key_id} is no principal of {args.policy_file}")
        version = version.with_signature(key, principal.name)
    applied = apply_policy(registry, version, keys[0])
    print(
        f"{registry.path}: policy version 1 in force (sha256 {version.sha256[:16]}…), signed by "
        + ", ".join(s.principal for s in version.signatures)
        + f"; {len(applied.principals)} principals, aliases "
        + ", ".join(sorted(applied.aliases))
    )
    return 0


def _policy_dispatch(args: argparse.Namespace) -> int:
    handler = getattr(args, "policy_handler", None)
    if handler is None:
        args.policy_parser.print_help()
        return 2
    return handler(args)


def _policy_propose(args: argparse.Namespace) -> int:
    from server.registry.governance import propose_policy
    from server.registry.policy_chain import write_version

    registry = _open(args)
    version = propose_policy(registry, _read_policy_mapping(args.policy_file), args.policy_file)
    write_version(args.out, version)
    print(
        f"wrote {args.out}: proposal of policy version {version.version} (sha256 "
        f"{version.sha256[:16]}…); sign it with `fedgov registry policy sign {args.out} --key K`"
    )
    return 0


def _governing(registry, version):
    """The policy whose governance rule ``version`` must meet (the head; version 1: itself)."""
    chain = registry.policy_chain()
    return chain.head if chain else version.parsed("the proposal")


def _policy_sign(args: argparse.Namespace) -> int:
    from server.registry.errors import VerificationError
    from server.registry.policy_chain import check_quorum, read_version, write_version
    from server.registry.signing import load_key

    key = load_key(args.key)
    registry = _open(args)
    version = read_version(args.proposal)
    version.parsed(args.proposal)
    governing = _governing(registry, version)
    principal = governing.principal_for_key(key.public_key)
    if principal is None or not governing.governance.may_sign(principal):
        raise VerificationError(
            f"--key: key {key.key_id} is not a governance signer under {governing.source}"
        )
    version = version.with_signature(key, principal.name)
    write_version(args.proposal, version)
    quorum = check_quorum(version, governing)
    print(
        f"{args.proposal}: signed by {principal.name}; {quorum.detail()}"
        + ("; ready to apply" if quorum.ok else "")
    )
    return 0


def _policy_apply(args: argparse.Namespace) -> int:
    from server.registry.governance import apply_policy
    from server.registry.policy_chain import read_version
    from server.registry.signing import load_key

    key = load_key(args.key)
    registry = _open(args)
    version = read_version(args.proposal)
    applied = apply_policy(registry, version, key)
    print(
        f"policy version {applied.version} in force (sha256 {applied.sha256[:16]}…), signed by "
        + ", ".join(s.principal for s in version.signatures)
    )
    return 0


def _policy_show(args: argparse.Namespace) -> int:
    import yaml

    from server.registry.errors import PolicyError

    registry = _open(args)
    chain = registry.policy_chain()
    if not chain:
        raise PolicyError(f"policy: {registry.path} has no policy yet (fedgov registry init)")
    wanted = args.version or chain.head.version
    match = [v for _, v, _ in chain.versions if v.version == wanted]
    if not match:
        raise PolicyError(
            f"--version: no policy version {wanted} (versions 1-{chain.head.version})"
        )
    data = match[0].as_dict()
    print(
        json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False), end=""
    )
    if args.json:
        print()
    return 0


def _policy_history(args: argparse.Namespace) -> int:
    from server.registry.errors import PolicyError
    from server.registry.governance import policy_history

    registry = _open(args)
    chain = policy_history(registry)
    if not chain:
        raise PolicyError(f"policy: {registry.path} has no policy yet (fedgov registry init)")
    rows = [
        {
            "version": v.version,
            "audit_seq": seq,
            "sha256": v.sha256,
            "signers": [s.principal for s in v.signatures],
            "principals": [p.name for p in policy.principals],
        }
        for seq, v, policy in chain.versions
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(
        ("version", "audit entry", "sha256", "signed by", "principals"),
        [
            (
                str(r["version"]),
                str(r["audit_seq"]),
                r["sha256"][:16],
                ", ".join(r["signers"]),
                ", ".join(r["principals"]),
            )
            for r in rows
        ],
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from server.registry.governance import resolve, verify_version
    from server.registry.manifest import canonical_json

    ref = _ref(args.ref)
    registry = _open(args)
    policy = registry.optional_policy(args.policy)
    record = resolve(registry, ref)
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
        anchor_path=args.anchor,
        reverify_seconds=args.reverify_seconds,
        token_file=args.token_file,
        public_scopes=args.public,
        max_body_bytes=args.max_body_bytes,
        key_path=args.key,
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
