"""`edgeserve experiment ...`: manage experiments on a running server over its API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import httpx

URL_OPTION = click.option(
    "--url",
    envvar="EDGESERVE_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="The server (or $EDGESERVE_URL).",
)
TOKEN_OPTION = click.option(
    "--token",
    envvar="EDGESERVE_TOKEN",
    default="",
    help="Bearer token (or $EDGESERVE_TOKEN); admin to change things.",
)


def _call(method: str, url: str, token: str, path: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        reply = httpx.request(
            method, url.rstrip("/") + path, json=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {type(exc).__name__}") from None
    if reply.status_code >= 400:
        try:
            message = reply.json().get("error", reply.text)
        except ValueError:
            message = reply.text[:200]
        raise click.ClickException(f"{reply.status_code}: {message}")
    return reply.json()


def _show(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


@click.group("experiment")
def experiment() -> None:
    """A/B experiments between model versions on a running server.

    Example: edgeserve experiment create exp.json --token "$ADMIN_TOKEN"
    """


@experiment.command("list")
@URL_OPTION
@TOKEN_OPTION
def list_(url: str, token: str) -> None:
    """List experiments (scope read)."""
    for exp in _call("GET", url, token, "/api/experiments"):
        weights = "/".join(f"{v['name']}:{v['weight']:g}" for v in exp["variants"])
        click.echo(
            f"{exp['id']}\t{exp['model']}\t{exp['status']}\t{exp['mode']}\t{weights}"
            f"\t{exp['decision']}"
        )


@experiment.command()
@URL_OPTION
@TOKEN_OPTION
@click.argument("definition", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def create(url: str, token: str, definition: Path) -> None:
    """Create an experiment from a JSON file (scope admin).

    Example file: {"id": "int8", "model": "digits", "unit": "header:x-user-id",
    "variants": [{"name": "fp32", "version": 1, "weight": 90},
    {"name": "int8", "version": 2, "weight": 10}], "auto": true}
    """
    try:
        doc = json.loads(definition.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{definition} is not JSON: {exc}") from None
    _show(_call("POST", url, token, "/api/experiments", doc))


def _action(name: str) -> click.Command:
    @click.command(name, help=f"{name.capitalize()} an experiment (scope admin).")
    @URL_OPTION
    @TOKEN_OPTION
    @click.argument("experiment_id")
    def command(url: str, token: str, experiment_id: str) -> None:
        exp = _call("POST", url, token, f"/api/experiments/{experiment_id}/{name}")
        click.echo(f"{exp['id']}: {exp['status']}")

    return command


for _name in ("pause", "resume", "stop", "conclude"):
    experiment.add_command(_action(_name))


@experiment.command()
@URL_OPTION
@TOKEN_OPTION
@click.argument("experiment_id")
@click.argument("weights", nargs=-1, type=float, required=True)
def weights(url: str, token: str, experiment_id: str, weights: tuple[float, ...]) -> None:
    """Set the variants' weights, in order (scope admin). Example: weights int8 80 20"""
    _show(
        _call(
            "PUT",
            url,
            token,
            f"/api/experiments/{experiment_id}/weights",
            {"weights": list(weights)},
        )
    )


@experiment.command()
@URL_OPTION
@TOKEN_OPTION
@click.option("--json", "as_json", is_flag=True, help="The whole report as JSON.")
@click.argument("experiment_id")
def report(url: str, token: str, experiment_id: str, as_json: bool) -> None:
    """Print a summary of the report: variants, the primary metric's difference with its
    interval, the sample ratio check and the decision (scope read).

    Example: edgeserve experiment report int8 --json | jq .comparisons
    """
    doc = _call("GET", url, token, f"/api/experiments/{experiment_id}/report")
    if as_json:
        _show(doc)
    else:
        click.echo(summary(doc))
    sys.stdout.flush()


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def summary(doc: dict[str, Any]) -> str:
    """A report as a person reads it: a few lines, not a hundred of JSON."""
    exp = doc["experiment"]
    lines = [
        f"experiment {exp['id']}: model {exp['model']}, {exp['mode']}, {exp['status']}, "
        f"unit {exp['unit']}",
        "",
    ]
    header = ["variant", "version", "weight", "units", "requests", "error rate", "p99 ms"]
    header += ["labelled", "accuracy", "KPI mean"]
    rows = [
        [
            v["name"],
            str(v["version"]),
            _num(v["weight"]),
            _num(v.get("units")),
            _num(v["requests"]),
            _num(v["error_rate"]),
            _num(v["latency_ms"]["p99"]),
            _num(v["labelled"]),
            _num(v["accuracy"]),
            _num(v["kpi_mean"]),
        ]
        for v in doc["variants"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    lines.append("")
    primary = [c for c in doc["comparisons"] if c["kind"] == "primary"]
    if not primary:
        lines.append(f"primary {exp['primary_metric']}: not enough data yet")
    for c in primary:
        seq = c["sequential"]
        interval = seq["confidence_sequence"]
        lines.append(
            f"primary {c['metric']}: {c['variant']} - control = {_num(seq['difference'])} "
            f"(95% always-valid interval [{_num(interval['low'])}, {_num(interval['high'])}], "
            f"p = {_num(seq['always_valid_p_value'])})"
        )
    srm = doc["sample_ratio_mismatch"]
    if srm is None:
        lines.append("sample ratio: not checked (shadow, or no traffic in this window)")
    else:
        verdict = "MISMATCH" if srm["mismatch"] else "ok"
        observed = "/".join(str(o) for o in srm["observed"])
        lines.append(f"sample ratio: {verdict} (units {observed}, p = {_num(srm['p_value'])})")
    decision = doc["decision"]
    word = "outcome" if decision.get("recorded") else "decision"
    lines.append(f"{word}: {decision['action']} - {decision['reason']}")
    return "\n".join(lines)
