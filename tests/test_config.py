"""Typed TOML configs: defaults, nesting, overrides, and errors that name the bad key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mfdetr.errors import MfdetrError
from mfdetr.utils.config import apply_overrides, from_dict, load_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"
    levels: list[str] | None = None


@dataclass
class Outer:
    name: str = "x"
    epochs: int = 1
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('name = "run"\n[inner]\nlr = 2\nlevels = ["b4", "e8"]\n')
    cfg = load_config(Outer, p, ["epochs=5", "inner.kind=b", "inner.lr=0.5"])
    assert cfg == Outer(name="run", epochs=5, inner=Inner(lr=0.5, kind="b", levels=["b4", "e8"]))
    assert isinstance(cfg.inner.lr, float)
    inner = {"lr": 0.5, "kind": "b", "levels": ["b4", "e8"]}
    assert to_dict(cfg) == {"name": "run", "epochs": 5, "inner": inner}


def test_unknown_key_names_it_and_valid_keys() -> None:
    with pytest.raises(MfdetrError) as e:
        from_dict(Outer, {"inner": {"lrr": 1.0}})
    assert "inner.lrr" in str(e.value) and "lr" in str(e.value)


def test_type_and_literal_errors_name_the_field() -> None:
    with pytest.raises(MfdetrError, match="epochs"):
        from_dict(Outer, {"epochs": "many"})
    with pytest.raises(MfdetrError, match="inner.kind"):
        from_dict(Outer, {"inner": {"kind": "c"}})


def test_override_syntax_errors() -> None:
    with pytest.raises(MfdetrError, match="key=value"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(MfdetrError, match="not a table"):
        apply_overrides({"epochs": 1}, ["epochs.x=2"])
    # values that are not TOML literals stay strings
    assert apply_overrides({}, ["out=runs/x"]) == {"out": "runs/x"}


def test_missing_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(MfdetrError, match="not found"):
        load_config(Outer, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(MfdetrError, match="bad.toml"):
        load_config(Outer, bad)


def test_train_config_from_an_ablation_inherits_its_base(tmp_path):
    """`train-from-cache --config ablation.toml` sees the base file's [train] under the ablation's own."""
    from mfdetr.train.config import build_train_config

    (tmp_path / "base.toml").write_text("[train]\nlr = 1e-3\nepochs = 3\n[train.model]\nhead = 'mfdetr'\n")
    (tmp_path / "abl.toml").write_text("base = 'base.toml'\n[train.model]\nhead = 'fcn'\n")
    cfg = build_train_config(tmp_path / "abl.toml", ["epochs=2"])
    assert (cfg.lr, cfg.epochs, cfg.model.head) == (1e-3, 2, "fcn")
