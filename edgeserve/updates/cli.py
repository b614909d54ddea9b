"""`edgeserve bundle ...` and `edgeserve update ...`: make bundles, install them, roll back.

`update apply` and `update rollback` write the slot store directly, so they work with
the server stopped; a running server serves the change after `SIGHUP`
(`systemctl reload edgeserve`), or upload over HTTP instead
(`POST /api/models/{name}/bundles`), which swaps at once.

Exit codes: 0 success, 1 failure (a refused bundle among them), 2 usage or config error.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from edgeserve.audit.offline import audit_command
from edgeserve.cli.options import CONFIG_OPTION, fail, load_or_exit
from edgeserve.runtime import ThreadPlan
from edgeserve.updates.keyring import open_store
from edgeserve.updates.validation import make_validator, record_samples
from updater import (
    BundleRejected,
    DevicePublicKey,
    FleetKey,
    SampleTensor,
    SlotStore,
    StoreError,
    TrustedKeys,
    UpdaterError,
    ValidationSample,
    create_bundle,
    inspect_bundle,
    load_signing_key,
    read_unwrap_key,
)
from updater.wrapping import Recipient


def parse_recipient(value: str) -> Recipient:
    """A fleet key file (`fleet:<b64>`), or a device public key (file or base64 text)."""
    path = Path(value)
    text = value
    if path.is_file():
        if path.read_text("ascii", errors="replace").startswith("fleet:"):
            key = read_unwrap_key(path)
            if isinstance(key, FleetKey):
                return key
        text = path.read_text("ascii").strip()
    text = text.removeprefix("x25519-public:")
    try:
        return DevicePublicKey.from_text(text)
    except ValueError:
        raise click.BadParameter(
            "give a fleet key file (fleet:<base64>) or a device public key",
            param_hint="--recipient",
        ) from None


def read_samples_file(path: Path) -> list[ValidationSample]:
    """Samples as JSON: [{"inputs": {name: {datatype, shape, data}}, "expected": {name:
    {"data": [...]}}, "tolerance": 0.001}, ...] (the manifest's own form)."""
    doc = json.loads(path.read_text("utf-8"))
    if not isinstance(doc, list):
        raise ValueError("the samples file must hold a JSON list")
    return [
        ValidationSample(
            inputs={
                n: SampleTensor(t["datatype"], tuple(t["shape"]), tuple(t["data"]))
                for n, t in s["inputs"].items()
            },
            expected={n: tuple(e["data"]) for n, e in s["expected"].items()},
            tolerance=float(s.get("tolerance", 0.0)),
        )
        for s in doc
    ]


@click.group("bundle")
def bundle() -> None:
    """Signed, encrypted model bundles.

    \b
    Example: edgeserve bundle create models/digits --version 3 \\
        --signing-key signing.pem --recipient fleet.key --out digits-3.bundle
    """


@bundle.command("create")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--version", "version", type=click.IntRange(1), required=True)
@click.option(
    "--source-version",
    type=click.IntRange(1),
    default=None,
    help="Model folder version to package (default: --version).",
)
@click.option("--signing-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--recipient", required=True, help="Fleet key file or device public key.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--samples", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--model", "model_name", default=None, help="Model name (default: folder name).")
@click.option("--expires-days", type=click.IntRange(1, 3650), default=None)
def bundle_create(
    model_dir: Path,
    version: int,
    source_version: int | None,
    signing_key: Path | None,
    recipient: str,
    out: Path,
    samples: Path | None,
    model_name: str | None,
    expires_days: int | None,
) -> None:
    """Build a bundle from MODEL_DIR/model.toml and MODEL_DIR/<version>/.

    Without --samples, validation samples are recorded by running the model on a few
    deterministic inputs built from its declared inputs.

    \b
    Example: edgeserve bundle create models/digits --version 3 --source-version 2 \\
        --signing-key keys/signing.pem --recipient keys/fleet.key --out digits-3.bundle
    """
    if signing_key is None:
        raise click.BadParameter("required", param_hint="--signing-key")
    to = parse_recipient(recipient)
    source = source_version or version
    staged = model_dir
    try:
        key = load_signing_key(signing_key)
        found = read_samples_file(samples) if samples else record_samples(model_dir, source)
        if source != version:
            staged = _stage(model_dir, source, version, out)
        expires = (
            datetime.now(timezone.utc) + timedelta(days=expires_days) if expires_days else None
        )
        manifest = create_bundle(
            staged,
            version,
            key,
            to,
            out,
            samples=found,
            model=model_name or model_dir.name,
            expires=expires,
        )
    except (UpdaterError, ValueError, OSError, KeyError) as exc:
        fail(f"cannot create the bundle: {exc}")
    finally:
        if staged != model_dir:
            _unstage(staged)
    click.echo(
        f"bundle: {out} model={manifest.model} version={manifest.version} "
        f"files={len(manifest.files)} samples={len(manifest.samples)}"
    )


def _stage(model_dir: Path, source: int, version: int, out: Path) -> Path:
    """A temp model folder whose <version>/ holds the files of <source>/ (no copies kept)."""
    import shutil
    import tempfile

    staged = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent)) / model_dir.name
    (staged / str(version)).mkdir(parents=True)
    shutil.copy(model_dir / "model.toml", staged / "model.toml")
    for f in (model_dir / str(source)).iterdir():
        if f.is_file():
            shutil.copy(f, staged / str(version) / f.name)
    return staged


def _unstage(staged: Path) -> None:
    import shutil

    shutil.rmtree(staged.parent, ignore_errors=True)


@bundle.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@CONFIG_OPTION
@click.option("--trusted-key", "trusted", multiple=True, help="Extra trusted public key.")
def bundle_inspect(path: Path, config_path: Path | None, trusted: tuple[str, ...]) -> None:
    """Verify the signature with the configured trusted keys and print the manifest.

    \b
    Example: edgeserve bundle inspect digits-3.bundle --config /etc/edgeserve/edgeserve.toml
    """
    settings = load_or_exit(config_path)
    try:
        keys = TrustedKeys.from_texts([*settings.updater.trusted_keys, *trusted])
        manifest = inspect_bundle(path, keys, settings.updater.max_bundle_bytes)
    except ValueError as exc:
        fail(str(exc))
    except BundleRejected as exc:
        fail(f"bundle rejected: {exc}")
    doc = manifest.to_json()
    doc["samples"] = len(manifest.samples)
    click.echo(json.dumps(doc, indent=1, sort_keys=True))
    click.echo(f"signature: valid (key {manifest.signing_key_id})", err=True)


@click.group("update")
def update() -> None:
    """Install bundles into the slot store, show status, roll back.

    \b
    Example: edgeserve update apply digits-3.bundle && systemctl reload edgeserve
    """


@update.command("apply")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@CONFIG_OPTION
@click.option("--allow-downgrade", is_flag=True, help="Install an older version on purpose.")
def update_apply(path: Path, config_path: Path | None, allow_downgrade: bool) -> None:
    """Verify, validate (in the real runtime) and install a bundle file.

    A running server serves it after SIGHUP; upload over HTTP to swap at once.

    \b
    Example: edgeserve update apply digits-3.bundle
    """
    settings = load_or_exit(config_path)
    try:
        store = open_store(settings, create_key=True)
        validate = make_validator(settings.models.backend, ThreadPlan())
        result = store.install(
            path,
            validate=validate,
            allow_downgrade=allow_downgrade,
            reason="edgeserve update apply",
            retry_ok=True,
        )
    except BundleRejected as exc:
        audit_command(settings, "update.install", path.name, "rejected", {"reason": exc.reason})
        fail(f"bundle rejected: {exc}")
    except (UpdaterError, ValueError, OSError) as exc:
        fail(str(exc))
    if result.already_installed:
        click.echo(
            f"already installed: model={result.model} version={result.version} is active "
            f"in slot={result.slot}; nothing to do"
        )
        return
    detail = {"version": result.version, "slot": result.slot, "allow_downgrade": allow_downgrade}
    if result.journal_error:
        detail["journal"] = "deferred"
        click.echo(
            f"edgeserve: warning: version {result.version} is active in slot {result.slot}, "
            f"but its journal entry could not be written ({result.journal_error}); the next "
            "edgeserve command records it (free some disk space first)",
            err=True,
        )
    audit_command(settings, "update.install", result.model, "ok", detail)
    click.echo(
        f"installed model={result.model} version={result.version} slot={result.slot} "
        f"previous={result.previous_version}; reload the server (SIGHUP) to serve it"
    )


@update.command("status")
@click.argument("model", required=False)
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def update_status(model: str | None, config_path: Path | None, as_json: bool) -> None:
    """Slots, versions, verdict and history of installed models.

    \b
    Example: edgeserve update status digits --json
    """
    settings = load_or_exit(config_path)
    try:
        store = open_store(settings, need_key=False)  # status needs no key
        names = [model] if model else store.model_names()
        docs = [_status_doc(store.state(n).to_json()) for n in names]
    except (UpdaterError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(docs if model is None else docs[0], indent=1))
        return
    for doc in docs:
        slots = ", ".join(
            f"{s}=v{r['version']}" if r else f"{s}=empty" for s, r in sorted(doc["slots"].items())
        )
        click.echo(
            f"{doc['model']}: active={doc['active']} verdict={doc['verdict']} "
            f"versions_seen={doc['versions_seen']} slots: {slots}"
        )
        for h in doc["history"][-10:]:
            reason = f" ({h['reason']})" if h["reason"] else ""
            click.echo(f"  {h['time']} {h['event']} v{h['version']} slot={h['slot']}{reason}")


def _status_doc(doc: dict[str, Any]) -> dict[str, Any]:
    doc.pop("format", None)
    return doc


@update.command("rollback")
@click.argument("model")
@CONFIG_OPTION
@click.option("--reason", default="rolled back by hand", show_default=True)
def update_rollback(model: str, config_path: Path | None, reason: str) -> None:
    """Flip MODEL back to its previous slot now; a running server serves it after SIGHUP.

    \b
    Example: edgeserve update rollback digits --reason "wrong labels"
    """
    settings = load_or_exit(config_path)
    try:
        store = open_store(settings)
        journal = store.rollback(model, reason)
    except StoreError as exc:
        done = _already_rolled_back(store, model)
        if done is not None:  # a retry after a kill that came after the flip
            click.echo(f"already rolled back: model={model} active_version={done}")
            return
        audit_command(settings, "update.rollback", model, "refused", {"error": exc.message})
        fail(exc.message)
    except (UpdaterError, ValueError, OSError) as exc:
        fail(str(exc))
    audit_command(
        settings,
        "update.rollback",
        model,
        "ok",
        {"reason": reason, "active_version": journal.active_version},
    )
    click.echo(f"rolled back model={model} active_version={journal.active_version}")


def _already_rolled_back(store: SlotStore, model: str) -> int | None:
    """The active version if the last thing that happened to `model` was a rollback."""
    try:
        journal = store.state(model)
    except StoreError:
        return None
    last = journal.history[-1] if journal.history else None
    if journal.verdict == "rolled_back" and last is not None and last.event == "rollback":
        return journal.active_version
    return None
