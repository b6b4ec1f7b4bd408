"""The model card (Markdown) of a version, rendered from its manifest (pure)."""

from __future__ import annotations

from typing import Any

from server.registry.manifest import privacy_summary


def render_model_card(manifest: dict[str, Any]) -> str:
    """A Markdown model card: what it predicts, from which data and run, how well, privacy."""
    schema = manifest["input_schema"]
    lineage = manifest["lineage"]
    model = manifest["model"]
    final = (manifest.get("metrics") or {}).get("final") or {}
    privacy = privacy_summary(manifest.get("privacy_report"))
    secagg = lineage.get("secure_aggregation") or {}
    lines = [
        f"# Model card: {manifest['name']} version {manifest['version']}",
        "",
        f"Published {manifest['created_at']} by the federated server with key "
        f"`{manifest['publisher']['key_id']}`. Status at publication: **candidate** — not "
        "approved for any use until the policy's approvers sign it and it is promoted.",
        "",
        "## What it predicts",
        "",
        f"- Target `{schema['target']}` of dataset `{schema['dataset']}`, classes: "
        + ", ".join(f"`{c}`" for c in schema["classes"]),
        f"- Model: `{model['architecture']}` ({model['parameters']:,} parameters), input shape "
        f"{tuple(schema['input_shape'])}",
    ]
    if schema["kind"] == "tabular":
        lines += [
            "- Inputs, in order (raw units; the server applies the published normalisation):",
            "",
            "| feature | type | transform |",
            "|---|---|---|",
        ]
        for f in schema["features"]:
            transform = (
                "log1p, then " if f["log1p"] else ""
            ) + f"(x − {f['mean']:.4g}) / {f['std']:.4g}"
            lines.append(f"| `{f['name']}` | {f['dtype']} | {transform} |")
    else:
        pre = schema["preprocessing"]
        lines.append(
            f"- Inputs: images of shape {tuple(schema['input_shape'])}, pixels in [0, 1]; the "
            f"server normalises with mean {pre['mean']} and std {pre['std']}"
        )
    lines += [
        "",
        "## How it was trained",
        "",
        f"- Federated learning with Flower, strategy `{lineage['strategy']}`, "
        f"{lineage['rounds_completed']} of {lineage['rounds']} rounds, seed {lineage['seed']}",
        f"- Sites ({len(lineage['sites'])}): " + ", ".join(f"`{s}`" for s in lineage["sites"]),
        "- Sites per round: " + ", ".join(str(n) for n in lineage["sites_per_round"]),
        f"- Secure aggregation: {'on' if secagg.get('enabled') else 'off'}",
        f"- Run id `{lineage['run_id']}`, code commit `{lineage.get('code_commit') or 'unknown'}`",
        "",
        "## Evaluation (final round)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for name, value in sorted(final.items()):
        lines.append(f"| {name} | {'-' if value is None else f'{value:.4f}'} |")
    lines += ["", "## Privacy", ""]
    if privacy["report"]:
        eps = privacy["epsilon"]
        lines += [
            f"- ε = {'none reported' if eps is None else f'{eps:.4g}'} at δ = {privacy['delta']} "
            "(the largest of the site-level ε and every site's sample-level ε)",
            f"- site-level ε: {privacy['site_level_epsilon']}; largest sample-level ε: "
            f"{privacy['sample_level_max_epsilon']}",
            "- Sample-level DP protects one record at one site; site-level DP protects a whole "
            "site's participation. The full report is in the manifest (`privacy_report`).",
        ]
    else:
        lines.append(
            "- No differential privacy report: this run gives no formal privacy guarantee."
        )
    lines += [
        "",
        "## Limitations",
        "",
        "- Evaluated only on the sites' held-out rows and the central hold-out named above; "
        "performance on other populations is unknown.",
        "- Predictions are class probabilities from a model trained on historical data; they are "
        "not a substitute for professional judgement.",
        "",
        "## Artifacts",
        "",
        "The manifest, signed with Ed25519, lists the sha256 of the weights (safetensors) and the "
        "ONNX export; `fedgov registry verify` re-checks them.",
        "",
    ]
    return "\n".join(lines)
