"""Feature flags: a kill switch and a rollout that take effect at once, and are heard."""

from __future__ import annotations

import threading

import pytest

from edgeserve.errors import InvalidInput
from edgeserve.experiments.flags import Flag, FlagStore, flag_from_json, model_flag

UNITS = [f"user-{i}" for i in range(5000)]


def _share(store: FlagStore, name: str) -> float:
    return sum(store.allows(name, u) for u in UNITS) / len(UNITS)


def test_kill_switch_turns_a_flag_off_for_everyone_at_the_next_call() -> None:
    store = FlagStore([Flag("new-digits", True, 100.0)])
    assert _share(store, "new-digits") == 1.0
    store.set_enabled("new-digits", False)
    assert _share(store, "new-digits") == 0.0
    store.set_enabled("new-digits", True)
    assert _share(store, "new-digits") == 1.0


def test_rollout_percent_lets_in_that_share_and_raising_it_only_adds_units() -> None:
    store = FlagStore()
    store.set_rollout("f", 10)
    ten = {u for u in UNITS if store.allows("f", u)}
    store.set_rollout("f", 30)
    thirty = {u for u in UNITS if store.allows("f", u)}
    assert ten <= thirty
    assert abs(len(ten) / len(UNITS) - 0.10) < 0.015
    assert abs(len(thirty) / len(UNITS) - 0.30) < 0.02


def test_an_unknown_flag_allows_and_a_removed_flag_stops_gating() -> None:
    store = FlagStore([Flag(model_flag("digits"), enabled=False)])
    assert model_flag("digits") == "model.digits"
    assert not store.allows("model.digits", "u")
    assert store.allows("model.other", "u")
    assert store.remove("model.digits")
    assert not store.remove("model.digits")
    assert store.allows("model.digits", "u")


def test_listeners_hear_every_change_in_order_with_old_and_new() -> None:
    store = FlagStore()
    heard: list[tuple[Flag | None, Flag | None]] = []
    store.on_change(lambda old, new: heard.append((old, new)))
    store.put(Flag("a"))
    store.set_enabled("a", False)
    store.remove("a")
    assert heard == [
        (None, Flag("a")),
        (Flag("a"), Flag("a", enabled=False)),
        (Flag("a", enabled=False), None),
    ]


def test_a_failing_listener_neither_blocks_the_change_nor_the_other_listeners() -> None:
    store = FlagStore()
    heard: list[str] = []

    def broken(old: Flag | None, new: Flag | None) -> None:
        raise RuntimeError("audit disk full")

    store.on_change(broken)
    store.on_change(lambda old, new: heard.append(new.name if new else "-"))
    store.put(Flag("a"))
    assert store.get("a") == Flag("a")
    assert heard == ["a"]


def test_concurrent_writers_and_readers_agree_with_the_audit_trail() -> None:
    store = FlagStore([Flag("f", True, 50.0)])
    trail: list[Flag | None] = []
    store.on_change(lambda old, new: trail.append(new))
    stop = threading.Event()
    seen_bad: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            flag = store.get("f")
            if not isinstance(flag, Flag) or flag.name != "f":
                seen_bad.append(flag)

    def writer(offset: int) -> None:
        for i in range(300):
            store.set_rollout("f", (offset + i) % 101)
            store.set_enabled("f", i % 2 == 0)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(k * 7,)) for k in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not seen_bad
    assert len(trail) == 4 * 300 * 2
    assert trail[-1] == store.get("f")  # the last change heard is the state in force


@pytest.mark.parametrize(
    ("name", "doc"),
    [
        ("bad name", {}),
        ("", {}),
        ("ok", {"enabled": "yes"}),
        ("ok", {"rollout_percent": 101}),
        ("ok", {"rollout_percent": True}),
        ("ok", {"rolout_percent": 5}),
        ("ok", ["enabled"]),
    ],
)
def test_bad_flag_definitions_are_refused(name: str, doc: object) -> None:
    with pytest.raises(InvalidInput):
        flag_from_json(name, doc)


def test_set_rollout_refuses_out_of_range() -> None:
    with pytest.raises(InvalidInput):
        FlagStore().set_rollout("f", 120)
