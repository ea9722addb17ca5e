from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from core.config import Config, ConfigError, config_from_dict, list_presets
from vlm.config import PolychromeConfig


@dataclass
class Inner(Config):
    rate: float = 0.5
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be in [0, 1], received {self.rate}")


@dataclass
class Outer(Config):
    size: int
    inner: Inner = field(default_factory=Inner)
    note: str | None = None


def test_every_preset_loads_and_validates():
    assert {"tiny", "shapes", "paper"} <= set(list_presets())
    for name in list_presets():
        cfg = PolychromeConfig.from_preset(name)
        assert cfg.name == name
        # Round trip through a dict gives an equal config.
        assert PolychromeConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*'shapes'.*'tiny'"):
        PolychromeConfig.from_preset("nope")


def test_nested_dict_builds_nested_dataclasses_and_ints_become_floats():
    cfg = Outer.from_dict({"size": 3, "inner": {"rate": 1, "names": ["a"]}})
    assert cfg == Outer(size=3, inner=Inner(rate=1.0, names=["a"]))
    assert isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"size": 3, "colour": 1}, r"unknown field\(s\) \['colour'\] for Outer"),
        ({"size": 3, "inner": {"rat": 0.1}}, r"unknown field\(s\) \['inner.rat'\]"),
        ({}, r"missing required field 'size'"),
        ({"size": "3"}, r"field 'size' expected int, received str '3'"),
        ({"size": True}, r"field 'size' expected int, received bool"),
        ({"size": 3, "inner": {"rate": "x"}}, r"field 'inner.rate' expected float"),
        ({"size": 3, "inner": {"names": [1]}}, r"field 'inner.names\[0\]' expected str"),
        (
            {"size": 3, "inner": {"rate": 2.0}},
            r"invalid Inner \(inner.\): rate must be in \[0, 1\]",
        ),
        ({"size": 3, "note": 5}, r"field 'note' expected"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(Outer, data, source="cfg.json")


def test_load_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"size": 3,')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON"):
        Outer.load(path)
    path.write_text(json.dumps({"size": 3, "extra": 1}))
    with pytest.raises(ConfigError, match=r"broken.json: unknown field"):
        Outer.load(path)
    with pytest.raises(ConfigError, match="not found"):
        Outer.load(tmp_path / "missing.json")


def test_save_load_round_trip(tmp_path):
    cfg = Outer(size=7, inner=Inner(rate=0.25, names=["x", "y"]), note="hi")
    cfg.save(tmp_path / "c.json")
    assert Outer.load(tmp_path / "c.json") == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_preset_validation_rejects_bad_values(tmp_path, monkeypatch):
    bad = PolychromeConfig.from_preset("tiny").to_dict()
    bad["llm"]["dtype"] = "int3"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    monkeypatch.setenv("POLYCHROME_CONFIG_DIR", str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"bad.json: invalid LLMConfig \(llm.\): dtype must be one of"
    ):
        PolychromeConfig.from_preset("bad")
