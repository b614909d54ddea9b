"""A promotion outlives a restart: saved state puts the winner back as the default version,
except on a model whose default the updater's installed slot decides."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edgeserve.experiments.service import ExperimentService
from edgeserve.experiments.settings import ExperimentSettings

KNOWN = {"digits": [1, 2, 3], "text": [1, 2]}


def _experiment(exp_id: str, model: str, promoted: object, at: float) -> dict:
    return {
        "id": exp_id,
        "model": model,
        "variants": [{"name": "a", "version": 1}, {"name": "b", "version": 2}],
        "status": "concluded",
        "decision": "promoted",
        "promoted_version": promoted,
        "history": [{"time": at, "event": "promoted", "reason": "better"}],
    }


def _load(state: Path, experiments: list[dict], installed: frozenset[str] = frozenset()) -> list:
    state.mkdir(exist_ok=True)
    (state / "experiments.json").write_text(json.dumps({"experiments": experiments}))
    promoted: list[tuple[str, int]] = []
    service = ExperimentService(
        ExperimentSettings(),
        state,
        known_models=lambda: KNOWN,
        promote=lambda model, version: promoted.append((model, version)),
        installed=lambda model: model in installed,
    )
    service.load()
    return promoted


def test_the_latest_promotion_per_model_is_applied_again(tmp_path: Path) -> None:
    promoted = _load(
        tmp_path,
        [
            _experiment("first", "digits", 2, at=100.0),
            _experiment("second", "digits", 3, at=200.0),
            _experiment("other", "text", 2, at=150.0),
        ],
    )
    assert promoted == [("digits", 3), ("text", 2)]


def test_an_installed_model_keeps_its_slot_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edgeserve.experiments.service"):
        promoted = _load(
            tmp_path, [_experiment("e", "digits", 2, at=1.0)], installed=frozenset({"digits"})
        )
    assert promoted == []
    assert "installed by the updater" in caplog.text


def test_state_saved_before_the_field_existed_restores_nothing(tmp_path: Path) -> None:
    old = _experiment("e", "digits", None, at=1.0)
    del old["promoted_version"]
    assert _load(tmp_path, [old]) == []


@pytest.mark.parametrize("bad", [-1, "2", True, 2.5])
def test_a_broken_promoted_version_skips_that_experiment_and_names_the_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: object
) -> None:
    with caplog.at_level(logging.ERROR, logger="edgeserve.experiments.service"):
        promoted = _load(
            tmp_path,
            [_experiment("broken", "digits", bad, at=1.0), _experiment("ok", "text", 2, at=1.0)],
        )
    assert promoted == [("text", 2)]
    assert "'promoted_version' has an invalid value" in caplog.text
