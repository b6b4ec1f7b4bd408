"""Privacy budget reports: ``privacy_report.json`` (the record), HTML and Markdown (for people).

:func:`report_document` turns what the server collected in a run (signed receipts and declines per
site, the site-level rounds) into the report's JSON document; :func:`verify_report` re-checks a
document from its own content — every receipt's Ed25519 signature, every ε recomputed by a fresh
Opacus accountant replaying the receipt's history and by an independent accountant (Google's
dp-accounting) — so ``fedgov privacy report`` can verify a report it did not write.
:func:`render_html` and :func:`render_markdown` are pure functions of the document; the HTML is
self-contained (inline CSS, the plot as a base64 PNG).

Keys (``docs/architecture.md``): ``delta``, ``secure_aggregation``, ``sample_level``
(``accountant``, ``sites.<id>.{epsilon, cap, declined_rounds, history}``) and ``site_level``
(``accountant``, ``epsilon``, ``clipping_norm``, ``history``), ``null`` for a mechanism that is
off; plus ``summary`` (the plain-words paragraph), per-round detail, receipts, ``verification``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Mapping
from typing import Any

from privacy.accountants import ACCOUNTANTS, AccountantSpec, as_history
from privacy.accounting import (
    epsilon,
    history_extends,
    normalise_history,
)
from privacy.receipts import Receipt, fingerprint

REPORT_VERSION = 1
#: Relative tolerance between the printed ε and an independent recomputation.
INDEPENDENT_TOLERANCE = 0.01


# ---- building the document ---------------------------------------------------------------------
def report_document(
    *,
    run_id: str,
    rounds: int,
    delta: float,
    accountant: str,
    secure_aggregation: bool,
    sample_level: Mapping[str, Any] | None,
    site_level: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The report's JSON document.

    ``sample_level``: ``{"noise_multiplier", "target_epsilon", "max_grad_norm",
    "grad_sample_mode", "sites": {site: {"receipts": [Receipt json], "declines": [{"round",
    "reason", "epsilon_spent", "cap", "receipt"?}]}}}``. ``site_level``: ``{"clipping_norm",
    "noise_multiplier", "sampling", "rounds": [{"round", "sampled", "contributed",
    "sample_rate", "noise_multiplier", "aborted", "note"}]}``.
    """
    document: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "run_id": run_id,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": rounds,
        "delta": delta,
        "accountant": accountant,
        "secure_aggregation": secure_aggregation,
        "sample_level": _sample_level(sample_level, delta, accountant) if sample_level else None,
        "site_level": _site_level(site_level, delta, accountant) if site_level else None,
    }
    # The run's own accountant: its config resolved it (a _target_ included) before the run.
    document["verification"] = verify_report(document, run_accountant=True)
    document["summary"] = summary_paragraph(document)
    return document


def _sample_level(data: Mapping[str, Any], delta: float, accountant: str) -> dict[str, Any]:
    sites: dict[str, Any] = {}
    for site_id, site in sorted(data["sites"].items()):
        receipts = [Receipt.from_json(r) for r in site.get("receipts", [])]
        declines = list(site.get("declines", []))
        rows: list[dict[str, Any]] = []
        for receipt in receipts:
            p = receipt.payload
            rows.append(
                {
                    "round": p["round"],
                    "status": "trained",
                    "epsilon": p["epsilon"],
                    "noise_multiplier": p["noise_multiplier"],
                    "sample_rate": p["sample_rate"],
                    "steps": p["steps"],
                }
            )
        for decline in declines:
            rows.append(
                {
                    "round": decline["round"],
                    "status": "declined",
                    "epsilon": decline.get("epsilon_spent"),
                    "reason": decline.get("reason", ""),
                }
            )
        rows.sort(key=lambda row: (row["round"], row["status"]))
        last_signed = _last_signed(receipts, declines)
        history = last_signed.payload["history"] if last_signed else []
        site_delta = last_signed.payload.get("delta", delta) if last_signed else delta
        caps = [r.payload.get("cap") for r in receipts] + [d.get("cap") for d in declines]
        caps = [c for c in caps if c is not None]
        epsilons = [row["epsilon"] for row in rows if row["epsilon"] is not None]
        this_run = [
            (r.payload["noise_multiplier"], r.payload["sample_rate"], r.payload["steps"])
            for r in receipts
        ]
        public_keys = {r.public_key for r in receipts}
        public_keys |= {
            bytes.fromhex(d["receipt"]["public_key"]) for d in declines if d.get("receipt")
        }
        sites[site_id] = {
            "epsilon": max(epsilons) if epsilons else 0.0,
            "epsilon_this_run": epsilon(this_run, site_delta, accountant),
            "cap": min(caps) if caps else None,
            "delta": site_delta,
            "declined_rounds": sorted(d["round"] for d in declines),
            "decline_reasons": {str(d["round"]): d.get("reason", "") for d in declines},
            "history": [list(entry) for entry in normalise_history(history)],
            "rounds": rows,
            "public_key_fingerprint": ", ".join(sorted(fingerprint(k) for k in public_keys)),
            "receipts": [r.to_json() for r in receipts],
            "decline_receipts": [d["receipt"] for d in declines if d.get("receipt")],
            "receipts_matched_updates": site.get("receipts_matched_updates", True),
        }
    return {
        "accountant": accountant,
        "neighbouring_relation": SAMPLE_LEVEL_RELATION,
        "mechanism": "DP-SGD at each site (Poisson sampling of records, per-record clipping, "
        "Gaussian noise), accounted by Opacus",
        "noise_multiplier": data.get("noise_multiplier"),
        "target_epsilon": data.get("target_epsilon") or None,
        "max_grad_norm": data.get("max_grad_norm"),
        "grad_sample_mode": data.get("grad_sample_mode"),
        "sites": sites,
    }


#: The neighbouring relation each guarantee holds for (stated in the JSON, HTML and MD reports).
SAMPLE_LEVEL_RELATION = (
    "add/remove one record at one site (each site's DP-SGD, accounted at that site's own δ)"
)
SITE_LEVEL_RELATION = (
    "add/remove one whole site (its clipped update); under secure aggregation the protected "
    "site's own noise share is not counted in the noise protecting it"
)


def _last_signed(receipts: list[Receipt], declines: list[dict[str, Any]]) -> Receipt | None:
    signed = [(r.payload["round"], 0, r) for r in receipts]
    signed += [
        (d["round"], 1, Receipt.from_json(d["receipt"])) for d in declines if d.get("receipt")
    ]
    return max(signed, key=lambda item: (item[0], item[1]))[2] if signed else None


def _site_level(data: Mapping[str, Any], delta: float, accountant: str) -> dict[str, Any]:
    rows = [dict(r) for r in data["rounds"]]
    history: list[tuple[float, float, int]] = []
    for row in rows:
        if not row.get("aborted") and row["noise_multiplier"] > 0:
            history.append((row["noise_multiplier"], row["sample_rate"], 1))
        row["epsilon"] = epsilon(history, delta, accountant)
    without_sampling = [(z, 1.0, n) for z, _, n in history]
    return {
        "accountant": accountant,
        "neighbouring_relation": SITE_LEVEL_RELATION,
        "noise_accounting": data.get("noise_accounting", ""),
        "mechanism": "DP-FedAvg: each site's update clipped to the clipping norm, Gaussian noise "
        "on the sum, sites Poisson-sampled each round",
        "sampling": data.get("sampling", "poisson"),
        "amplification_by_sampling": bool(data.get("amplification", True)),
        "clipping_norm": data["clipping_norm"],
        "noise_multiplier": data["noise_multiplier"],
        "epsilon": epsilon(history, delta, accountant),
        "epsilon_if_participation_is_public": epsilon(without_sampling, delta, accountant),
        "history": [list(entry) for entry in normalise_history(history)],
        "rounds": rows,
    }


# ---- verification --------------------------------------------------------------------------------
def verify_report(document: Mapping[str, Any], run_accountant: bool = False) -> dict[str, Any]:
    """Re-check a report from its own content.

    Per receipt: the signature (and one key per site), the payload's ε against a fresh accountant
    replaying its history (same accountant, relative 1e-6) and against an independent accountant
    (within 1%), and that each receipt's history extends the previous one's. The site-level ε is
    recomputed from its history the same two ways. Only a registered accountant re-checks: a
    report cannot make the verifier import code (an unregistered name or a ``_target_`` path is a
    problem, its ε left unchecked), except ``run_accountant=True`` (the run writing its own report,
    whose config already resolved its accountant). One without an independent method is replayed
    only.
    """
    verifier = _ReportVerifier(document, run_accountant)
    sample = document.get("sample_level")
    per_site = {
        site_id: verifier.site(site_id, site)
        for site_id, site in (sample or {}).get("sites", {}).items()
    }
    site_level_ok = verifier.site_level(document.get("site_level"))
    return {
        "receipts_checked": verifier.checked,
        "receipts_verified": all(per_site.values()) if per_site else None,
        "sites_verified": per_site,
        "site_level_verified": site_level_ok,
        "independent_accountant": _independent_name(document["accountant"], run_accountant),
        "max_relative_difference": verifier.worst,
        "problems": verifier.problems,
        "ok": not verifier.problems,
    }


class _ReportVerifier:
    """The checks of :func:`verify_report`, and what they found so far."""

    def __init__(self, document: Mapping[str, Any], run_accountant: bool) -> None:
        self.document, self.run_accountant = document, run_accountant
        self.accountant: str = document["accountant"]
        self.delta: float = document["delta"]
        self.run_id = str(document.get("run_id") or "")
        self.problems: list[str] = []
        self.checked = 0
        self.worst = 0.0  # the largest relative gap to the independent accountant
        self._unchecked: set[str] = set()

    def registered(self, name: str) -> AccountantSpec | None:
        """``name``'s accountant, if registered here (else one problem line per name)."""
        if name in ACCOUNTANTS or (self.run_accountant and name == self.accountant):
            return ACCOUNTANTS.resolve(name)
        if name not in self._unchecked:
            self._unchecked.add(name)
            self.problems.append(
                f"accountant '{name}' is not registered here (known: "
                f"{', '.join(ACCOUNTANTS.names())}); its ε values were not re-checked"
            )
        return None

    def epsilon_matches(
        self, spec: AccountantSpec, history: Any, delta: float, stated: float, where: str
    ) -> bool:
        """``stated`` ε against a replay of ``history`` (relative 1e-6) and, where the
        accountant has one, its independent method (within ``INDEPENDENT_TOLERANCE``)."""
        entries = normalise_history(history)
        replayed = spec.epsilon(as_history(entries), float(delta)) if entries else 0.0
        ok = math.isclose(replayed, stated, rel_tol=1e-6, abs_tol=1e-9)
        if not ok:
            self.problems.append(f"{where}: ε {stated} but its history gives {replayed}")
        if spec.independent is None or stated <= 0:
            return ok
        other = spec.independent(as_history(entries), float(delta)) if entries else 0.0
        difference = abs(other - stated) / stated
        self.worst = max(self.worst, difference)
        if difference > INDEPENDENT_TOLERANCE:
            self.problems.append(f"{where}: independent accountant gives {other}, not {stated}")
            return False
        return ok

    def site(self, site_id: str, site: Mapping[str, Any]) -> bool:
        """Every receipt of one site, in round order, and its reported ε."""
        receipts = [Receipt.from_json(r) for r in site.get("receipts", [])]
        receipts += [Receipt.from_json(r) for r in site.get("decline_receipts", [])]
        ok = True
        keys = {r.public_key for r in receipts}
        if len(keys) > 1:
            self.problems.append(f"{site_id}: receipts signed by {len(keys)} different keys")
            ok = False
        previous: list[Any] = []
        for receipt in sorted(receipts, key=lambda r: (r.payload["round"], r.payload["kind"])):
            self.checked += 1
            if not receipt.verify() or receipt.payload.get("site") != site_id:
                self.problems.append(
                    f"{site_id} round {receipt.payload['round']}: signature does not verify"
                )
                ok = False
                continue
            ok = self.receipt(site_id, receipt.payload, previous) and ok
            previous = receipt.payload["history"]
        if site.get("receipts_matched_updates") is False:
            self.problems.append(f"{site_id}: a receipt did not match the update the server got")
            ok = False
        if site.get("epsilon", 0) > 0 and receipts:
            top = max(r.payload["epsilon"] for r in receipts)
            if not math.isclose(top, site["epsilon"], rel_tol=1e-9):
                self.problems.append(f"{site_id}: reported ε {site['epsilon']} ≠ receipts' {top}")
                ok = False
        return ok

    def receipt(self, site_id: str, payload: Mapping[str, Any], previous: list[Any]) -> bool:
        """One signed receipt's payload: its run, its history, its ε and the site's cap."""
        where = f"{site_id} round {payload['round']}"
        ok = True
        if payload["kind"] == "dp-sgd" and self.run_id and str(payload.get("run")) != self.run_id:
            self.problems.append(f"{where}: receipt of run {payload.get('run')}, not of this run")
            ok = False
        history = payload["history"]
        if not history_extends(previous, history):
            self.problems.append(f"{where}: history does not extend the previous receipt's")
            ok = False
        stated = payload["epsilon"]
        spec = self.registered(payload.get("accountant", self.accountant))
        if spec is None:
            return False
        delta = payload.get("delta", self.delta)
        ok = self.epsilon_matches(spec, history, delta, stated, where) and ok
        cap = payload.get("cap")
        if payload["kind"] == "dp-sgd" and cap is not None and stated > cap * (1 + 1e-9):
            self.problems.append(f"{where}: ε {stated} above the site's cap {cap}")
            ok = False
        return ok

    def site_level(self, site_level: Mapping[str, Any] | None) -> bool | None:
        """The site-level ε against its history (None when the run had no site-level DP)."""
        if not site_level:
            return None
        spec = self.registered(self.accountant)
        if spec is None:
            return False
        return self.epsilon_matches(
            spec, site_level["history"], self.delta, site_level["epsilon"], "site level"
        )


def _independent_name(accountant: str, run_accountant: bool) -> str:
    """The report's accountant's independent method, in words."""
    known = accountant in ACCOUNTANTS or run_accountant
    spec = ACCOUNTANTS.resolve(accountant) if known else None
    if spec is None:
        return f"none ('{accountant}' is not registered here)"
    return spec.independent_name or f"none ('{accountant}' registers no independent method)"


# ---- words -------------------------------------------------------------------------------------
def _eps(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def summary_paragraph(document: Mapping[str, Any]) -> str:
    """The report's first paragraph, for a reader with no background in differential privacy."""
    parts: list[str] = []
    delta = document["delta"]
    sample = document.get("sample_level")
    site_level = document.get("site_level")
    if sample and not sample["sites"]:
        parts.append(
            "No site trained in this run: no site spent any privacy budget, and no update left "
            "a site, so there were no receipts to verify."
        )
    elif sample:
        sites = sample["sites"]
        spent = [s["epsilon"] for s in sites.values()]
        caps = sorted({s["cap"] for s in sites.values() if s["cap"] is not None})
        declined = [site for site, s in sites.items() if s["declined_rounds"]]
        cap_words = (
            f"its own limit of {_eps(caps[0])}"
            if len(caps) == 1
            else "its own limit (" + ", ".join(_eps(c) for c in caps) + ")"
            if caps
            else "its own limit"
        )
        parts.append(
            f"This training run used differential privacy to protect every individual record "
            f"held at each of the {len(sites)} sites: the model the sites trained together can "
            f"reveal only a bounded amount about any single record (a patient, a customer). That "
            f"bound is the privacy loss ε — smaller is more private. Each site kept its own "
            f"account and enforced {cap_words} itself; the highest ε any site reached is "
            f"{_eps(max(spent) if spent else 0.0)}, with a {delta:g} chance that the guarantee "
            f"does not hold (δ)."
        )
        if declined:
            parts.append(
                f"{len(declined)} site{'s' if len(declined) != 1 else ''} ("
                + ", ".join(declined)
                + ") stopped contributing when a further round would have exceeded its limit."
            )
    if site_level:
        parts.append(
            (
                "It also protected"
                if sample
                else "This training run used differential privacy to protect"
            )
            + " each site as a whole: whether or not any one site took part changes what "
            f"the final model can reveal by a privacy loss of at most ε = "
            f"{_eps(site_level['epsilon'])} (δ = {delta:g})."
        )
    verification = document.get("verification") or {}
    if sample and sample["sites"]:
        checked = verification.get("receipts_checked", 0)
        if verification.get("receipts_verified"):
            parts.append(
                f"Every site signed a receipt for each update it sent; all {checked} receipts "
                "were verified and their ε values recomputed independently."
            )
        else:
            parts.append("Some receipts could NOT be verified: see the verification section.")
    parts.append(
        "Secure aggregation was on: the server saw only the sum of the sites' updates."
        if document.get("secure_aggregation")
        else "Secure aggregation was off: the server saw each site's update."
    )
    parts.append(
        "As a rule of thumb, ε below 1 is strong protection, up to about 10 is common in "
        "deployed systems, and well above 10 the guarantee is weak."
    )
    return " ".join(parts)


def guarantee_lines(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, statement) of each guarantee, with its parameters."""
    lines = []
    sample = document.get("sample_level")
    if sample:
        sigma = (
            f"target ε {sample['target_epsilon']:g} (σ chosen by each site)"
            if sample.get("target_epsilon")
            else f"σ = {sample['noise_multiplier']:g}"
        )
        lines.append(
            (
                "Sample-level (one record at one site)",
                f"DP-SGD at every site: {sigma}, per-record clipping norm C = "
                f"{sample['max_grad_norm']:g}, Poisson sampling of records; accountant "
                f"{sample['accountant'].upper()}; ε per site below; enforced by each site. "
                "Neighbouring relation: "
                f"{sample.get('neighbouring_relation', SAMPLE_LEVEL_RELATION)}.",
            )
        )
    site_level = document.get("site_level")
    if site_level:
        rates = sorted({round(r["sample_rate"], 6) for r in site_level["rounds"]})
        if not site_level.get("amplification_by_sampling", True):
            sampling = (
                f"sites {site_level['sampling']}-sampled but accounted at q = 1 (under secure "
                "aggregation the server sees who takes part, so no amplification is claimed)"
            )
        elif rates == [1.0]:
            sampling = "every site in every round (q = 1)"
        else:
            sampling = f"sites {site_level['sampling']}-sampled at rate q = " + ", ".join(
                f"{q:g}" for q in rates
            )
        lines.append(
            (
                "Site-level (a whole site, for the federation)",
                f"DP-FedAvg: update clipping norm C = {site_level['clipping_norm']:g}, noise "
                f"multiplier z = {site_level['noise_multiplier']:g} on the sum, {sampling}"
                + f"; ε = {_eps(site_level['epsilon'])} (accountant "
                f"{site_level['accountant'].upper()}); "
                f"{_eps(site_level['epsilon_if_participation_is_public'])} if who took part in "
                "each round is disclosed. Neighbouring relation: "
                f"{site_level.get('neighbouring_relation', SITE_LEVEL_RELATION)}.",
            )
        )
    return lines


# ---- rendering ---------------------------------------------------------------------------------
def budget_plot_png(document: Mapping[str, Any]) -> bytes | None:
    """ε by round: each site's sample-level ε against its cap, and the site-level ε (PNG)."""
    sample = document.get("sample_level")
    site_level = document.get("site_level")
    if not sample and not site_level:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in (sample, site_level) if p]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.0), squeeze=False)
    column = 0
    if sample:
        ax = axes[0][column]
        column += 1
        for site_id, site in sample["sites"].items():
            rounds = [r["round"] for r in site["rounds"] if r["epsilon"] is not None]
            values = [r["epsilon"] for r in site["rounds"] if r["epsilon"] is not None]
            (line,) = ax.step(rounds, values, where="post", marker="o", label=site_id)
            declined = [r["round"] for r in site["rounds"] if r["status"] == "declined"]
            if declined:
                ax.plot(
                    declined,
                    [site["epsilon"]] * len(declined),
                    "x",
                    color=line.get_color(),
                    markersize=9,
                )
        for cap in sorted({s["cap"] for s in sample["sites"].values() if s["cap"] is not None}):
            ax.axhline(cap, linestyle="--", color="crimson", linewidth=1)
            ax.annotate(
                f"cap {cap:g}",
                (0.01, cap),
                xycoords=("axes fraction", "data"),
                color="crimson",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Sample-level ε spent by each site (× = declined)")
        ax.set_xlabel("round")
        ax.set_ylabel(f"ε (δ = {document['delta']:g})")
        ax.grid(alpha=0.3)
        if len(sample["sites"]) <= 12:
            ax.legend(fontsize=7, loc="lower right")
    if site_level:
        ax = axes[0][column]
        rows = site_level["rounds"]
        ax.step(
            [r["round"] for r in rows],
            [r["epsilon"] for r in rows],
            where="post",
            marker="o",
            color="navy",
        )
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Site-level ε of the federation")
        ax.set_xlabel("round")
        ax.set_ylabel(f"ε (δ = {document['delta']:g})")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1100px;color:#1b1b1b;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.summary{font-size:1.08rem;background:#f4f7fb;border-left:4px solid #2b6cb0;padding:.8rem 1rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}th{background:#f0f0f0}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}
code{background:#f3f3f3;padding:0 .2rem}img{max-width:100%}
"""


def render_html(document: Mapping[str, Any]) -> str:
    """A self-contained HTML page (inline CSS, the plot as a base64 PNG data URI)."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Privacy report — run {e(str(document['run_id']))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Privacy budget report — run {e(str(document['run_id']))}</h1>",
        f'<p class="summary" id="summary">{e(document["summary"])}</p>',
        "<h2>Guarantees</h2><table><tr><th>guarantee</th><th>what holds</th></tr>",
    ]
    for name, statement in guarantee_lines(document):
        out.append(f"<tr><td>{e(name)}</td><td>{e(statement)}</td></tr>")
    out.append("</table>")
    out.append(
        "<table>"
        + "".join(
            f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _overview(document).items()
        )
        + "</table>"
    )
    png = budget_plot_png(document)
    if png:
        data = base64.b64encode(png).decode("ascii")
        out.append(
            '<h2>Privacy budget by round</h2><img id="budget-plot" alt="ε by round" '
            f'src="data:image/png;base64,{data}">'
        )
    sample = document.get("sample_level")
    if sample:
        out.append(
            "<h2>Sites (sample-level)</h2><table><tr><th>site</th><th>ε spent</th><th>cap</th>"
            "<th>ε this run</th><th>δ</th><th>declined rounds</th><th>receipts verified</th>"
            "<th>signing key</th></tr>"
        )
        verified = (document.get("verification") or {}).get("sites_verified", {})
        for site_id, site in sample["sites"].items():
            ok = verified.get(site_id)
            mark = '<span class="ok">yes</span>' if ok else '<span class="bad">NO</span>'
            out.append(
                f"<tr><td>{e(site_id)}</td><td>{_eps(site['epsilon'])}</td>"
                f"<td>{_eps(site['cap'])}</td><td>{_eps(site['epsilon_this_run'])}</td>"
                f"<td>{site['delta']:g}</td>"
                f"<td>{e(', '.join(map(str, site['declined_rounds'])) or 'none')}</td>"
                f"<td>{mark}</td><td><code>{e(site['public_key_fingerprint'])}</code></td></tr>"
            )
        out.append("</table>")
        out.append(
            "<h2>Rounds per site</h2><table><tr><th>site</th><th>round</th><th>status</th>"
            "<th>ε after</th><th>σ</th><th>q</th><th>steps</th></tr>"
        )
        for site_id, site in sample["sites"].items():
            for row in site["rounds"]:
                out.append(
                    f"<tr><td>{e(site_id)}</td><td>{row['round']}</td><td>{e(row['status'])}"
                    + (f" — {e(row['reason'])}" if row.get("reason") else "")
                    + f"</td><td>{_eps(row['epsilon'])}</td>"
                    f"<td>{_num(row.get('noise_multiplier'))}</td>"
                    f"<td>{_num(row.get('sample_rate'))}</td><td>{row.get('steps', '')}</td></tr>"
                )
        out.append("</table>")
    site_level = document.get("site_level")
    if site_level:
        out.append(
            "<h2>Federation rounds (site-level)</h2><table><tr><th>round</th><th>sampled</th>"
            "<th>contributed</th><th>q</th><th>noise multiplier in the sum</th><th>ε after</th>"
            "<th>note</th></tr>"
        )
        for row in site_level["rounds"]:
            out.append(
                f"<tr><td>{row['round']}</td><td>{row['sampled']}</td><td>{row['contributed']}"
                f"</td><td>{row['sample_rate']:.3g}</td><td>{row['noise_multiplier']:.3g}</td>"
                f"<td>{_eps(row['epsilon'])}</td>"
                f"<td>{e(('aborted: ' if row.get('aborted') else '') + row.get('note', ''))}"
                "</td></tr>"
            )
        out.append("</table>")
    out.append(_verification_html(document))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


def _overview(document: Mapping[str, Any]) -> dict[str, str]:
    sample = document.get("sample_level")
    site_level = document.get("site_level")
    return {
        "δ": f"{document['delta']:g}",
        "accountant": document["accountant"].upper(),
        "rounds": str(document["rounds"]),
        "secure aggregation": "on" if document["secure_aggregation"] else "off",
        "sample-level DP": "on" if sample else "off",
        "site-level DP": "on" if site_level else "off",
        **(
            {
                "σ (DP-SGD)": (
                    f"{sample['noise_multiplier']:g}"
                    if not sample.get("target_epsilon")
                    else f"per site, for target ε {sample['target_epsilon']:g}"
                ),
                "C (per record)": f"{sample['max_grad_norm']:g}",
            }
            if sample
            else {}
        ),
        **(
            {
                "z (site level)": f"{site_level['noise_multiplier']:g}",
                "C (per site update)": f"{site_level['clipping_norm']:g}",
                "site sampling": site_level["sampling"],
            }
            if site_level
            else {}
        ),
    }


def _verification_html(document: Mapping[str, Any]) -> str:
    v = document.get("verification") or {}
    e = html.escape
    status = '<span class="ok">passed</span>' if v.get("ok") else '<span class="bad">FAILED</span>'
    if v.get("ok") and not v.get("receipts_checked"):
        status = "had nothing to check (no site trained)"
    lines = [
        "<h2>Verification</h2>",
        f"<p>Verification {status}: {v.get('receipts_checked', 0)} receipts checked "
        "(Ed25519 signatures; each ε replayed by a fresh Opacus accountant from the receipt's "
        f"history and recomputed with {e(str(v.get('independent_accountant', '')))}; largest "
        f"relative difference {100 * v.get('max_relative_difference', 0):.3f}%).</p>",
    ]
    if v.get("problems"):
        lines.append("<ul>" + "".join(f"<li>{e(p)}</li>" for p in v["problems"]) + "</ul>")
    return "\n".join(lines)


def render_markdown(document: Mapping[str, Any]) -> str:
    """The report as Markdown (the plot lives in the HTML)."""
    out = [f"# Privacy budget report — run {document['run_id']}", "", document["summary"], ""]
    out += ["## Guarantees", ""]
    for name, statement in guarantee_lines(document):
        out.append(f"- **{name}**: {statement}")
    out += ["", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _overview(document).items()]
    sample = document.get("sample_level")
    verified = (document.get("verification") or {}).get("sites_verified", {})
    if sample:
        out += [
            "",
            "## Sites (sample-level)",
            "",
            "| site | ε spent | cap | ε this run | declined rounds | receipts verified |",
            "|---|---|---|---|---|---|",
        ]
        for site_id, site in sample["sites"].items():
            out.append(
                f"| {site_id} | {_eps(site['epsilon'])} | {_eps(site['cap'])} | "
                f"{_eps(site['epsilon_this_run'])} | "
                f"{', '.join(map(str, site['declined_rounds'])) or 'none'} | "
                f"{'yes' if verified.get(site_id) else 'NO'} |"
            )
        out += ["", "ε by round:", ""]
        for site_id, site in sample["sites"].items():
            steps = ", ".join(
                f"r{row['round']} {_eps(row['epsilon'])}"
                + (" (declined)" if row["status"] == "declined" else "")
                for row in site["rounds"]
            )
            out.append(f"- {site_id}: {steps}")
    site_level = document.get("site_level")
    if site_level:
        out += ["", "## Federation (site-level)", ""]
        out += ["| round | sampled | contributed | q | z | ε |", "|---|---|---|---|---|---|"]
        for row in site_level["rounds"]:
            out.append(
                f"| {row['round']} | {row['sampled']} | {row['contributed']} | "
                f"{row['sample_rate']:.3g} | {row['noise_multiplier']:.3g} | "
                f"{_eps(row['epsilon'])} |"
            )
    v = document.get("verification") or {}
    out += [
        "",
        "## Verification",
        "",
        f"{'Passed' if v.get('ok') else 'FAILED'}: {v.get('receipts_checked', 0)} receipts "
        f"checked; independent accountant {v.get('independent_accountant', '')}, largest relative "
        f"difference {100 * v.get('max_relative_difference', 0):.3f}%.",
    ]
    out += [f"- {p}" for p in v.get("problems", [])]
    return "\n".join(out) + "\n"
