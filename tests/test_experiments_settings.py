"""Experiments in edgeserve.toml: definitions and flags are checked when the config is
read, and every error names the key at fault."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeserve.config.loader import ConfigError, load_settings
from edgeserve.errors import InvalidInput
from edgeserve.experiments.model import experiment_from_json, parse_definition

DOCUMENTED = Path(__file__).resolve().parent.parent / "edgeserve.toml"


def _documented_example() -> str:
    """The commented [[experiments.define]] example of edgeserve.toml, uncommented."""
    text = DOCUMENTED.read_text()
    block = text[text.index("# [[experiments.define]]") :]
    lines = []
    for line in block.splitlines():
        if not line.startswith("#"):
            break
        body = line[2:]
        if body.startswith("#") or not body.strip():
            continue
        lines.append(re.sub(r"\s+#.*$", "", body))
    return "\n".join(lines) + "\n"


def test_the_documented_example_is_a_valid_definition(tmp_path: Path) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(_documented_example())
    settings = load_settings(path)
    (doc,) = settings.experiments.define
    exp = experiment_from_json(doc, known_models={"digits": [1, 2]})
    assert (exp.id, exp.model, exp.unit, exp.mode) == ("digits-v2", "digits", "request_id", "split")
    assert [(v.name, v.version, v.weight) for v in exp.variants] == [
        ("v1", 1, 90.0),
        ("v2", 2, 10.0),
    ]
    assert exp.salt == "digits-v2"  # salt defaults to the id: same id, same buckets


def test_every_experiment_field_is_documented_in_the_example() -> None:
    example = _documented_example()
    documented = set(re.findall(r"^(\w+) =", example, re.M))
    internal = {
        "stage",
        "decision",
        "promoted_version",
        "reason",
        "created",
        "history",
        "running_p",
    }
    fields = set(parse_definition.__globals__["Experiment"].__dataclass_fields__) - internal
    assert fields <= documented, sorted(fields - documented)


def test_flags_and_inline_definitions_load(tmp_path: Path) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(
        "[experiments]\n"
        'define = [{id = "a", model = "m", variants = [{name = "c", version = 1},'
        ' {name = "t", version = 2}]}]\n'
        '[experiments.flags]\n"model.m" = {enabled = false}\n'
    )
    settings = load_settings(path)
    assert settings.experiments.flags == {"model.m": {"enabled": False}}
    assert settings.experiments.define[0]["id"] == "a"


BROKEN = [
    (
        "variants = [{name = 'c', version = 1}]",
        "experiments.define[0]: 'variants' must list 2 to 8",
    ),
    (
        "variants = [{name = 'c', version = 1}, {name = 't', version = 2, wieght = 5}]",
        "experiments.define[0]: variants[1]: unknown field 'wieght'",
    ),
    (
        "variants = [{name = 'c', version = 1}, {name = 'c', version = 2}]",
        "experiments.define[0]: variant names must be unique",
    ),
    (
        "variants = [{name = 'c', version = 1, weight = 0}, {name = 't', version = 2, weight = 0}]",
        "experiments.define[0]: variant weights must not all be 0",
    ),
    ("mode = 'mirror'", "experiments.define[0]: 'mode' has an invalid value"),
    ("unit = 'cookie'", "experiments.define[0]: 'unit' has an invalid value"),
    ("stages = [50, 5]", "experiments.define[0]: 'stages' must be increasing"),
    ("colour = 'red'", "experiments.define[0]: unknown experiment field 'colour'"),
    ("primary_metric = 'event:buy'", "experiments.define[0]: 'unit': primary_metric 'event:buy'"),
]


@pytest.mark.parametrize(("line", "message"), BROKEN, ids=[m for _, m in BROKEN])
def test_broken_definitions_stop_start_up_naming_the_key(
    tmp_path: Path, line: str, message: str
) -> None:
    base = {
        "id": "'e'",
        "model": "'m'",
        "variants": "[{name = 'c', version = 1}, {name = 't', version = 2}]",
    }
    key = line.split(" =")[0]
    base[key] = line.split("= ", 1)[1]
    path = tmp_path / "edgeserve.toml"
    path.write_text("[[experiments.define]]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert message in str(caught.value)


def test_the_same_id_twice_is_refused(tmp_path: Path) -> None:
    one = (
        "[[experiments.define]]\nid = 'e'\nmodel = 'm'\n"
        "variants = [{name = 'c', version = 1}, {name = 't', version = 2}]\n"
    )
    path = tmp_path / "edgeserve.toml"
    path.write_text(one + one)
    with pytest.raises(ConfigError, match=r"experiments.define\[1\].id: 'e' is defined twice"):
        load_settings(path)


def test_a_bad_flag_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text("[experiments.flags]\nnew = {enabled = true, rollout_percent = 150}\n")
    with pytest.raises(ConfigError, match=r"experiments\.flags\.new: 'rollout_percent' must be"):
        load_settings(path)


def test_versions_are_checked_against_the_loaded_models_later() -> None:
    doc = {
        "id": "e",
        "model": "m",
        "variants": [{"name": "c", "version": 1}, {"name": "t", "version": 9}],
    }
    parse_definition(doc)  # fine without knowing the models
    with pytest.raises(InvalidInput, match=r"variants\[1\].version: model m has no version 9"):
        experiment_from_json(doc, known_models={"m": [1, 2]})
    with pytest.raises(InvalidInput, match="unknown model 'm'"):
        experiment_from_json(doc, known_models={"other": [1]})
