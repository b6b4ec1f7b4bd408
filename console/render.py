"""Server-rendered HTML of the console's pages: pure functions of the pages' JSON data.

No JavaScript and no external resources: inline CSS, charts as inline SVG, reasons in ``title``
attributes (hover) and in tables. Numbers carry ``data-site``/``data-field`` attributes so that a
reader (or a test) can match each shown value with the JSON twin.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from console.svg import epsilon_chart

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1b1b1b;
line-height:1.4}main{max-width:1200px;margin:0 auto;padding:0 1rem 2rem}
nav{background:#1d3557;padding:.55rem 1rem}
nav a{color:#fff;margin-right:1.2rem;text-decoration:none}
nav a.here{font-weight:700;border-bottom:2px solid #fff}
h1{font-size:1.45rem}h2{font-size:1.15rem;margin-top:1.8rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr>td:first-child{white-space:nowrap}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#666}
.banner{padding:.6rem .9rem;margin:1rem 0;border-left:4px solid #b42318;background:#fdf0ef}
.note{padding:.6rem .9rem;margin:1rem 0;border-left:4px solid #2b6cb0;background:#f4f7fb}
td.trained{background:#d8f0dc}td.declined{background:#fde7c8}td.refused{background:#f9d0cc}
td.dropped{background:#e6dcf3}td.not-asked{background:#f6f6f6;color:#999}
code{background:#f3f3f3;padding:0 .2rem}.bar{height:.7rem;background:#2b6cb0;display:inline-block}
.barbox{width:120px;background:#e8e8e8;display:inline-block;margin-right:.4rem}
@media print{nav{display:none}}
"""

_HERE = ' class="here"'
PAGES = (("/", "Federation budget"), ("/runs", "Runs"), ("/models", "Models"))


def eps(value: Any) -> str:
    """An ε (or any budget number) as shown: 3 decimals, '—' when absent."""
    return "—" if value is None else f"{float(value):.3f}"


def num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{float(value):.{digits}g}"


def yes_no(value: Any, yes: str = "verified", no: str = "FAILED") -> str:
    return f'<span class="ok">{yes}</span>' if value else f'<span class="bad">{no}</span>'


def page(title: str, body: str, here: str = "", json_url: str | None = None) -> str:
    """A full HTML page with the console's navigation."""
    links = "".join(
        f'<a href="{url}"{_HERE if url == here else ""}>{escape(name)}</a>' for url, name in PAGES
    )
    twin = (
        f'<p class="muted">JSON twin: <a href="{escape(json_url)}">{escape(json_url)}</a></p>'
        if json_url
        else ""
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} — fedgov console</title><style>{CSS}</style></head><body>"
        f'<nav><a href="/"><b>fedgov console</b></a>{links}</nav><main>'
        f"<h1>{escape(title)}</h1>{body}{twin}</main></body></html>\n"
    )


def message_page(message: str, status: int) -> str:
    """A page with one clear message (bad input, wrong URL, unreadable registry, wrong token)."""
    titles = {401: "Token required", 404: "Not found", 405: "Read-only", 503: "Unavailable"}
    title = titles.get(status, "Bad request" if status < 500 else "Error")
    return page(title, f'<p class="banner" id="message">{escape(message)}</p>')


# ---- federation budget --------------------------------------------------------------------------


def federation_html(data: dict[str, Any]) -> str:
    budget = data["budget"]
    out = [
        '<p class="note">Each site enforces its own privacy budget across runs. ε spent is the '
        "latest ε a site signed in a verified receipt (its ledger is cumulative); a receipt that "
        "fails verification is listed below and not counted.</p>"
    ]
    for item in budget["unreadable_runs"]:
        out.append(f'<p class="banner">Run {escape(item["run"])}: {escape(item["error"])}</p>')
    if budget["failed_receipts"]:
        out.append(
            f'<p class="banner" id="failed-receipts-banner">{len(budget["failed_receipts"])} '
            "receipt(s) FAILED verification and are not counted (see below).</p>"
        )
    out.append(
        '<h2>Sites</h2><table id="sites"><tr><th>site</th><th>ε spent</th><th>cap</th>'
        "<th>δ</th><th>remaining</th><th></th><th>trained</th><th>declined</th><th>refused</th>"
        "<th>dropped</th><th>reasons</th><th>last seen</th><th>receipts</th></tr>"
    )
    for s in budget["sites"]:
        site = escape(s["site"])
        share = 0.0
        if s["epsilon"] is not None and s["cap"]:
            share = min(s["epsilon"] / s["cap"], 1.0)
        reasons = "; ".join(
            f"{status}: " + ", ".join(f"{escape(r)} ×{n}" for r, n in items.items())
            for status, items in s["reasons"].items()
        )
        seen = s["last_seen"]
        seen_text = (
            f'<span title="{escape(seen["at"] or "")}">run {escape(seen["run"])} round '
            f"{seen['round']} ({escape(seen['status'])})</span>"
            if seen
            else "—"
        )
        receipts = f"{s['verified_receipts']} verified"
        if s["failed_receipts"]:
            receipts += f', <span class="bad">{s["failed_receipts"]} FAILED</span>'
        if s["problem"]:
            receipts += f'<br><span class="bad">{escape(s["problem"])}</span>'
        out.append(
            f'<tr data-site="{site}"><td>{site}</td>'
            f'<td class="num" data-site="{site}" data-field="epsilon">{eps(s["epsilon"])}</td>'
            f'<td class="num" data-site="{site}" data-field="cap">{eps(s["cap"])}</td>'
            f'<td class="num" data-site="{site}" data-field="delta">{num(s["delta"])}</td>'
            f'<td class="num" data-site="{site}" data-field="remaining">{eps(s["remaining"])}</td>'
            f'<td><span class="barbox"><span class="bar" style="width:{100 * share:.0f}%">'
            "</span></span></td>"
            + "".join(
                f'<td class="num" data-site="{site}" data-field="{k}">{s["rounds"][k]}</td>'
                for k in ("trained", "declined", "refused", "dropped")
            )
            + f"<td>{reasons or '—'}</td><td>{seen_text}</td><td>{receipts}</td></tr>"
        )
    out.append("</table>")
    out.append("<h2>Cumulative ε per site across runs</h2>")
    out.append(epsilon_chart(budget))
    if budget["failed_receipts"]:
        out.append(
            '<h2>Receipts that failed verification</h2><table id="failed-receipts"><tr>'
            "<th>site</th><th>run</th><th>round</th><th>kind</th><th>stated ε</th><th>why</th></tr>"
        )
        for f in budget["failed_receipts"]:
            out.append(
                f'<tr class="failed"><td>{escape(f["site"])}</td><td>{_run_link(f["run"])}</td>'
                f"<td>{f['round']}</td><td>{escape(str(f['kind']))}</td>"
                f"<td>{eps(f['epsilon'])}</td>"
                f'<td class="bad">FAILED: {escape("; ".join(f["problems"]))}</td></tr>'
            )
        out.append("</table>")
    return page("Federation privacy budget", "".join(out), "/", "/?format=json")


def _run_link(key: str) -> str:
    return f'<a href="/runs/{quote(key)}">{escape(key)}</a>'


# ---- runs ---------------------------------------------------------------------------------------


def runs_html(data: dict[str, Any]) -> str:
    out = [f"<p>Runs under <code>{escape(data['root'])}</code>, oldest first.</p>"]
    out.append(
        '<table id="runs"><tr><th>run</th><th>run id</th><th>finished</th><th>rounds</th>'
        "<th>guarantees</th><th>receipts</th><th>final accuracy (hold-out)</th></tr>"
    )
    for run in data["runs"]:
        if run.get("error"):
            out.append(
                f'<tr><td>{escape(run["key"])}</td><td colspan="6" class="bad">'
                f"{escape(run['error'])}</td></tr>"
            )
            continue
        privacy = run.get("privacy")
        receipts = (
            "no privacy report"
            if not privacy
            else yes_no(privacy["verification"]["ok"])
            + f" ({privacy['verification']['receipts_checked']} checked)"
        )
        out.append(
            f"<tr><td>{_run_link(run['key'])}</td><td>{escape(run['run_id'])}</td>"
            f"<td>{escape(run['finished_at'] or '—')}</td><td>{len(run['rounds'])}</td>"
            f"<td>{guarantee_words(privacy, run)}</td><td>{receipts}</td>"
            f"<td>{num(run['final'].get('central_eval_accuracy'))}</td></tr>"
        )
    out.append("</table>")
    return page("Runs", "".join(out), "/runs", "/runs?format=json")


def guarantee_words(privacy: dict[str, Any] | None, run: dict[str, Any] | None = None) -> str:
    """The run's guarantees in one line (HTML-escaped)."""
    if not privacy:
        secagg = ((run or {}).get("config") or {}).get("secagg.name")
        return escape(
            "no differential privacy"
            + (f"; secure aggregation {secagg}" if secagg and secagg != "off" else "")
        )
    g = privacy["guarantees"]
    parts = []
    if g["sample_level"]:
        parts.append("sample-level DP (DP-SGD at each site)")
    if g["site_level"]:
        parts.append(f"site-level DP (ε {eps(g['site_level_epsilon'])})")
    if g.get("neighbouring_relation"):
        parts.append(f"neighbouring relation: {g['neighbouring_relation']}")
    parts.append(f"δ {num(g['delta'])}")
    parts.append(f"accountant {str(g['accountant']).upper()}")
    parts.append("secure aggregation " + ("on" if g["secure_aggregation"] else "off"))
    return escape("; ".join(parts))


def run_html(run: dict[str, Any]) -> str:
    key = run["key"]
    json_url = f"/runs/{quote(key)}?format=json"
    if run.get("error"):
        return page(
            f"Run {key}",
            f'<p class="banner" id="message">{escape(run["error"])}</p>',
            "/runs",
            json_url,
        )
    privacy = run.get("privacy")
    out = [
        f"<p>Run id <code>{escape(run['run_id'])}</code>, folder <code>{escape(run['path'])}"
        f"</code>, finished {escape(run['finished_at'] or '—')}.</p>",
        f'<h2>Guarantees</h2><p id="guarantees">{guarantee_words(privacy, run)}</p>',
    ]
    if privacy:
        v = privacy["verification"]
        out.append(
            f'<p id="verification">Receipts: {yes_no(v["ok"])}, {v["receipts_checked"]} '
            "checked (re-verified now: signatures, ε replayed by Opacus and dp-accounting).</p>"
        )
        if v["problems"]:
            out.append(
                '<ul class="bad">'
                + "".join(f"<li>{escape(p)}</li>" for p in v["problems"])
                + "</ul>"
            )
        if v["stored_ok"] and not v["ok"]:
            out.append(
                '<p class="banner">The report file says its receipts verified; they do not now '
                "(the file was changed after the run).</p>"
            )
    out.append("<h2>Participation (site × round)</h2>")
    out.append(_matrix(run))
    if privacy and privacy.get("sample_level"):
        out.append(
            '<h2>Privacy per site</h2><table id="run-sites"><tr><th>site</th><th>ε spent</th>'
            "<th>cap</th><th>δ</th><th>ε this run</th><th>declined rounds</th><th>receipts</th>"
            "</tr>"
        )
        for site_id, s in privacy["sample_level"]["sites"].items():
            site = escape(site_id)
            failed = [r for r in s["receipts"] if not r["verified"]]
            status = yes_no(not failed and s["verified"])
            if failed:
                status += " " + escape(
                    ", ".join(f"round {r['round']} ({r['kind']})" for r in failed)
                )
            out.append(
                f'<tr data-site="{site}"><td>{site}</td>'
                f'<td class="num" data-site="{site}" data-field="epsilon">{eps(s["epsilon"])}</td>'
                f'<td class="num">{eps(s["cap"])}</td><td class="num">{num(s["delta"])}</td>'
                f'<td class="num">{eps(s["epsilon_this_run"])}</td>'
                f"<td>{escape(', '.join(map(str, s['declined_rounds'])) or 'none')}</td>"
                f"<td>{status}</td></tr>"
            )
        out.append("</table>")
    out.append('<h2>Final metrics</h2><table id="final">')
    for name, value in run["final"].items():
        out.append(f'<tr><th>{escape(name)}</th><td class="num">{num(value)}</td></tr>')
    out.append("</table>")
    if run["files"]:
        out.append("<h2>Report files</h2><ul>")
        for name in run["files"]:
            out.append(
                f'<li><a href="/runs/{quote(key)}/files/{quote(name)}">{escape(name)}</a></li>'
            )
        if privacy:
            out.append(
                f'<li><a href="/runs/{quote(key)}/files/privacy_report.md">privacy_report.md'
                "</a> (rendered from the JSON)</li>"
            )
        out.append("</ul>")
    return page(f"Run {key}", "".join(out), "/runs", json_url)


def _matrix(run: dict[str, Any]) -> str:
    rounds = [str(r["round"]) for r in run["rounds"]]
    if not rounds:
        return '<p class="muted">No rounds recorded (metrics.json absent).</p>'
    out = ['<table id="participation"><tr><th>site</th>']
    out += [f"<th>{r}</th>" for r in rounds]
    out.append("</tr>")
    reasons = []
    for site_id, cells in run["participation"].items():
        out.append(f"<tr><td>{escape(site_id)}</td>")
        for r in rounds:
            cell = cells.get(r, {"status": "not asked", "reason": ""})
            status = cell["status"]
            title = f' title="{escape(cell["reason"])}"' if cell["reason"] else ""
            out.append(
                f'<td class="{status.replace(" ", "-")}" data-site="{escape(site_id)}" '
                f'data-round="{r}"{title}>{escape(status)}</td>'
            )
            if cell["reason"]:
                reasons.append((site_id, r, status, cell["reason"]))
        out.append("</tr>")
    out.append("</table>")
    if reasons:
        out.append(
            '<table id="reasons"><tr><th>site</th><th>round</th><th>status</th><th>reason</th></tr>'
        )
        for site_id, r, status, reason in reasons:
            out.append(
                f"<tr><td>{escape(site_id)}</td><td>{r}</td><td>{escape(status)}</td>"
                f"<td>{escape(reason)}</td></tr>"
            )
        out.append("</table>")
    aborted = [r for r in run["rounds"] if r["aborted"]]
    for r in aborted:
        out.append(
            f'<p class="banner">Round {r["round"]} aborted: {escape(str(r["abort_reason"]))}</p>'
        )
    return "".join(out)


# ---- models -------------------------------------------------------------------------------------


def _audit_html(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return ""
    if audit["ok"]:
        text = (
            f'<p id="audit">Audit chain: <span class="ok">intact</span> — {audit["entries"]} '
            f"entries, head entry {audit['head_seq']} <code>{audit['head_hash'][:16]}…</code>"
        )
    else:
        text = (
            '<p id="audit" class="banner">Audit chain: <span class="bad">FAILED</span> — '
            + escape("; ".join(audit["problems"]))
        )
    anchor = audit.get("anchor")
    if anchor is None:
        return (
            text + ". No checkpoint given: whether the chain extends an external anchor is not "
            "checked.</p>"
        )
    if anchor["extends"]:
        return (
            text + f'. <span id="anchor" class="ok">Extends the checkpoint</span> of entry '
            f"{anchor['seq']} signed by {escape(str(anchor['signer']))} "
            f"(<code>{escape(anchor['file'])}</code>).</p>"
        )
    return (
        text + f'. <span id="anchor" class="bad">Not shown to extend the checkpoint</span> '
        f"<code>{escape(anchor['file'])}</code>.</p>"
    )


def models_html(data: dict[str, Any]) -> str:
    if data.get("error"):
        return page(
            "Models",
            f'<p class="banner" id="message">{escape(data["error"])}</p>',
            "/models",
            "/models?format=json",
        )
    out = [f"<p>Registry <code>{escape(data['registry'])}</code>.</p>", _audit_html(data["audit"])]
    policy = data["policy"]
    if policy["problem"]:
        out.append(f'<p class="banner">{escape(policy["problem"])}</p>')
    else:
        out.append(
            f"<p>Policy <code>{escape(policy['source'])}</code> (sha256 "
            f"<code>{escape(policy['sha256'][:16])}…</code>).</p>"
        )
    for model in data["models"]:
        name = escape(model["name"])
        out.append(f'<h2 id="model-{name}">{name}</h2>')
        aliases = ", ".join(
            f"@{escape(a)} → {v['version']}" for a, v in sorted(model["aliases"].items())
        )
        out.append(f"<p>Aliases: {aliases or 'none'}</p>")
        aliases_governed = sorted({a for v in model["versions"] for a in v["gates"]})
        out.append(
            '<table class="versions"><tr><th>version</th><th>published</th><th>run</th>'
            "<th>strategy</th><th>rounds</th><th>sites</th><th>privacy ε</th>"
            "<th>signature</th>"
            + "".join(f"<th>gates @{escape(a)}</th>" for a in aliases_governed)
            + "<th>decisions</th></tr>"
        )
        for v in reversed(model["versions"]):
            lin = v["lineage"]
            ref = escape(v["ref"])
            cells = []
            for alias in aliases_governed:
                gate = v["gates"].get(alias)
                if gate is None:
                    cells.append("<td>—</td>")
                    continue
                unmet = [g for g in gate["results"] if not g["passed"]]
                text = (
                    '<span class="ok">met</span>'
                    if gate["passed"]
                    else '<span class="bad">unmet</span>: '
                    + escape("; ".join(f"{g['gate']}" for g in unmet))
                )
                if gate["awaiting"]:
                    text += "<br>awaiting: " + escape(", ".join(gate["awaiting"]))
                cells.append(f'<td data-ref="{ref}" data-alias="{escape(alias)}">{text}</td>')
            decisions = ", ".join(
                f"{escape(d['principal'])} {escape(d['decision'])}"
                + ("" if d["counted"] else " (not counted)")
                for d in v["decisions"]
            )
            out.append(
                f'<tr data-ref="{ref}"><td><a href="/models/{quote(v["name"])}/{v["version"]}">'
                f"{ref}</a></td><td>{escape(v['created_at'])}</td>"
                f"<td>{escape(str(lin['run_id']))}</td><td>{escape(str(lin['strategy']))}</td>"
                f"<td>{lin['rounds_completed']}</td><td>{len(lin['sites'])}</td>"
                f'<td class="num" data-ref="{ref}" data-field="epsilon">'
                f"{eps(v['privacy'].get('epsilon'))}</td>"
                f"<td>{yes_no(v['verification']['ok'])}</td>{''.join(cells)}"
                f"<td>{decisions or '—'}</td></tr>"
            )
        out.append("</table>")
        out.append(_alias_history(model["alias_history"]))
    if not data["models"]:
        out.append('<p class="muted">The registry holds no model yet.</p>')
    return page("Models", "".join(out), "/models", "/models?format=json")


def _alias_history(history: list[dict[str, Any]]) -> str:
    if not history:
        return '<p class="muted">No promotion yet.</p>'
    out = [
        '<table class="alias-history"><tr><th>audit entry</th><th>at</th><th>alias</th>'
        "<th>version</th><th>previously</th><th>by</th><th></th></tr>"
    ]
    for p in history:
        out.append(
            f"<tr><td>{p['seq']}</td><td>{escape(p['at'])}</td><td>@{escape(p['alias'])}</td>"
            f"<td>{p['version']}</td><td>{p['previous_version'] or '—'}</td>"
            f"<td>{escape(p['by'])}</td><td>{'rollback' if p['rollback'] else 'promotion'}</td>"
            "</tr>"
        )
    out.append("</table>")
    return "".join(out)


def version_html(data: dict[str, Any]) -> str:
    v = data["version"]
    ref = v["ref"]
    base = f"/models/{quote(v['name'])}/{v['version']}"
    lin = v["lineage"]
    out = [
        _audit_html(data.get("audit")),
        f"<p>Manifest sha256 <code>{escape(v['manifest_sha256'])}</code>, published "
        f"{escape(v['created_at'])} by key <code>{escape(v['publisher_key_id'])}</code>.</p>",
        f'<p><a href="{base}/statement">Privacy budget statement (HTML)</a> · '
        f'<a href="{base}/statement.pdf">PDF</a></p>',
        '<h2>Lineage</h2><table id="lineage">',
    ]
    run_link = _run_link(data["run"]) if data.get("run") else escape(str(lin["run_id"]))
    rows = [
        ("run", run_link),
        ("dataset", escape(str(lin["dataset"]))),
        ("strategy", escape(str(lin["strategy"]))),
        ("rounds", f"{lin['rounds_completed']} of {lin['rounds']}"),
        ("sites", escape(", ".join(lin["sites"]))),
        ("privacy", escape(str(lin["privacy"]))),
        ("secure aggregation", "on" if lin["secure_aggregation"] else "off"),
        ("privacy ε (max over sites / site level)", eps(v["privacy"].get("epsilon"))),
        ("δ", num(v["privacy"].get("delta"))),
        ("code commit", escape(str(lin["code_commit"]))),
    ]
    out += [f"<tr><th>{k}</th><td>{val}</td></tr>" for k, val in rows]
    out.append("</table><h2>Verification</h2><table>")
    for c in v["verification"]["checks"]:
        out.append(
            f"<tr><td>{escape(c['what'])}</td><td>{yes_no(c['ok'], 'ok', 'FAILED')}</td>"
            f"<td>{escape(c['detail'])}</td></tr>"
        )
    out.append("</table><h2>Final metrics</h2><table>")
    out += [f"<tr><th>{escape(k)}</th><td>{num(val)}</td></tr>" for k, val in v["metrics"].items()]
    out.append("</table><h2>Gates</h2>")
    if not v["gates"]:
        out.append('<p class="muted">No policy: gates cannot be evaluated.</p>')
    for alias, gate in v["gates"].items():
        out.append(
            f"<h3>@{escape(alias)}: "
            + (
                '<span class="ok">all gates met</span>'
                if gate["passed"]
                else '<span class="bad">blocked</span>'
            )
            + f'</h3><table class="gates" data-alias="{escape(alias)}">'
        )
        for g in gate["results"]:
            out.append(
                f'<tr data-gate="{escape(g["gate"])}"><td>{escape(g["gate"])}</td>'
                f"<td>{yes_no(g['passed'], 'met', 'unmet')}</td><td>{escape(g['detail'])}</td></tr>"
            )
        out.append("</table>")
        if gate["awaiting"]:
            out.append(
                f'<p data-alias="{escape(alias)}" class="awaiting">Still to approve (any of): '
                f"{escape(', '.join(gate['awaiting']))}"
                + "".join(
                    f"; role {escape(role)} held by {escape(', '.join(names) or 'nobody')}"
                    for role, names in gate["required_roles_missing"].items()
                )
                + f". May promote: {escape(', '.join(gate['promoters']))}.</p>"
            )
    out.append(
        '<h2>Decisions</h2><table id="decisions"><tr><th>#</th><th>decision</th><th>by</th>'
        "<th>key</th><th>at</th><th>comment</th><th>counted</th></tr>"
    )
    for d in v["decisions"]:
        out.append(
            f"<tr><td>{d['id']}</td><td>{escape(d['decision'])}</td>"
            f"<td>{escape(d['principal'])}</td><td><code>{escape(d['key_id'])}</code></td>"
            f"<td>{escape(d['at'])}</td><td>{escape(d['comment'])}</td>"
            f"<td>{yes_no(d['counted'], 'yes', 'no')}</td></tr>"
        )
    out.append("</table>")
    for reason in v["ignored_decisions"]:
        out.append(f'<p class="bad">Not counted: {escape(reason)}</p>')
    return page(f"Model {ref}", "".join(out), "/models", f"{base}?format=json")


# ---- the statement ------------------------------------------------------------------------------


def statement_html(s: dict[str, Any], *, standalone: bool = False) -> str:
    """The privacy budget statement (``standalone``: no navigation, for the PDF)."""
    g = s["guarantees"]
    d = s["data"]
    out = [
        f"<p>Model <b>{escape(s['model'])}</b>, manifest sha256 "
        f"<code>{escape(s['manifest_sha256'])}</code>, published {escape(s['created_at'])} "
        f"(signature {yes_no(s['version_verified'])}).</p>",
        "<h2>Data</h2>",
        f"<p>Trained on <b>{escape(str(d['dataset']))}</b> in run "
        f"<code>{escape(str(d['run_id']))}</code> ({escape(str(d['strategy']))}, "
        f"{d['rounds']} rounds) across {len(s['sites'])} sites.</p>",
        '<table id="statement-sites"><tr><th>site</th><th>records</th><th>ε spent</th>'
        "<th>cap</th><th>δ</th><th>receipts (verified / signed)</th><th>signing key</th></tr>",
    ]
    for site in s["sites"]:
        name = escape(site["site"])
        out.append(
            f'<tr data-site="{name}"><td>{name}</td><td class="num">'
            f"{site['records'] if site['records'] is not None else '—'}</td>"
            f'<td class="num" data-site="{name}" data-field="epsilon">{eps(site["epsilon"])}</td>'
            f'<td class="num">{eps(site["cap"])}</td><td class="num">{num(site["delta"])}</td>'
            f"<td>{site['receipts_verified']} / {site['receipts']}</td>"
            f"<td><code>{escape(', '.join(site['signing_keys']) or '—')}</code></td></tr>"
        )
    out.append("</table><h2>Guarantees</h2>")
    if g:
        out.append(f'<p id="statement-guarantees">{guarantee_words({"guarantees": g})}.</p>')
        if s.get("summary"):
            out.append(f"<p>{escape(s['summary'])}</p>")
    else:
        out.append('<p class="bad">No privacy report: this model carries no DP guarantee.</p>')
    r = s["receipts"]
    out.append(
        f'<h2>Receipts</h2><p id="statement-receipts">{r["receipts_checked"]} signed receipts '
        f"re-verified now: {yes_no(r['ok'])}.</p>"
    )
    if r["problems"]:
        out.append(
            '<ul class="bad">' + "".join(f"<li>{escape(p)}</li>" for p in r["problems"]) + "</ul>"
        )
    out.append(
        '<h2>Approvals</h2><table id="statement-approvals"><tr><th>by</th><th>decision</th>'
        "<th>at</th><th>comment</th><th>key</th></tr>"
    )
    for a in s["approvals"]:
        out.append(
            f"<tr><td>{escape(a['principal'])}</td><td>{escape(a['decision'])}</td>"
            f"<td>{escape(a['at'])}</td><td>{escape(a['comment'])}</td>"
            f"<td><code>{escape(a['key_id'])}</code></td></tr>"
        )
    out.append("</table>")
    if not s["approvals"]:
        out.append('<p class="muted">No signed decision yet.</p>')
    for alias, gate in s["gates"].items():
        out.append(
            f"<p>@{escape(alias)}: "
            + ("all gates met" if gate["passed"] else "blocked")
            + (f"; approved by {escape(', '.join(gate['approvers']))}" if gate["approvers"] else "")
            + (f"; awaiting {escape(', '.join(gate['awaiting']))}" if gate["awaiting"] else "")
            + ".</p>"
        )
    title = f"Privacy budget statement — {s['model']}"
    body = "".join(out)
    if standalone:
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{escape(title)}</h1>{body}</main></body></html>\n"
        )
    name, _, version = s["model"].partition(":")
    base = f"/models/{quote(name)}/{version}/statement"
    return page(
        title,
        body + f'<p><a href="{base}.pdf">Download as PDF</a></p>',
        "/models",
        f"{base}?format=json",
    )
