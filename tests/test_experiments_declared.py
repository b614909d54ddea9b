"""With `[experiments] runtime_changes = false` the config's `define` is the whole truth on
every start: a replica that keeps its state folder (a StatefulSet volume) must agree with a
fresh one after a ConfigMap change. Runtime state (status, history, running p-values) is
carried over for ids still declared; an experiment removed from the config stops."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.serving import run_server


def _declared(*blocks: str) -> str:
    return "[auth]\nenabled = false\n[experiments]\nruntime_changes = false\n" + "".join(blocks)


def _experiment(exp_id: str, weights: tuple[int, int]) -> str:
    return (
        f'[[experiments.define]]\nid = "{exp_id}"\nmodel = "digits"\n'
        f'variants = [{{name = "v1", version = 1, weight = {weights[0]}}}, '
        f'{{name = "v2", version = 2, weight = {weights[1]}}}]\n'
    )


def _get(url: str, exp_id: str) -> dict:
    reply = httpx.get(f"{url}/api/experiments/{exp_id}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_restart_takes_the_configs_definition_over_saved_state(tmp_path: Path) -> None:
    with run_server(tmp_path, _declared(_experiment("split", (90, 10)))) as first:
        before = _get(first.url, "split")
        assert [v["weight"] for v in before["variants"]] == [90, 10]
    with run_server(tmp_path, _declared(_experiment("split", (50, 50)))) as second:
        after = _get(second.url, "split")
    assert [v["weight"] for v in after["variants"]] == [50, 50]
    assert after["status"] == "active"
    # runtime state of a still-declared id is carried over: its history goes on
    assert after["history"][0] == before["history"][0]
    assert after["created"] == before["created"]


def test_an_experiment_removed_from_the_config_is_no_longer_active(tmp_path: Path) -> None:
    with run_server(tmp_path, _declared(_experiment("old", (50, 50)))) as first:
        assert _get(first.url, "old")["status"] == "active"
    with run_server(tmp_path, _declared()) as second:
        listed = httpx.get(f"{second.url}/api/experiments", timeout=10).json()
        active = [e["id"] for e in listed if e["status"] == "active"]
        assert "old" not in active
