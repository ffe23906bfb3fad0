"""Typed dataclass configs loaded from TOML, with ``key.sub=value`` overrides.

Every config in mfdetr is a (possibly nested) dataclass. ``from_dict`` builds one from a plain
dict and rejects unknown keys with an error naming the key and the valid ones; ``load_toml``
reads a TOML file into a dict; ``apply_overrides`` applies ``a.b=value`` strings (values parsed as
TOML literals, falling back to plain strings); ``to_dict`` goes back for checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from mfdetr.errors import MfdetrError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict; a clear error names the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise MfdetrError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise MfdetrError(f"{path}: invalid TOML: {e}") from e


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_toml_with_base(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file (a pipeline) as a dict, with ``base = "other.toml"`` (relative to the file) merged under it.

    ``name`` is never inherited: it defaults to the file's stem, so an ablation that only changes the
    mask network gets its own output folder while sharing the base's caches.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise MfdetrError(f"config files include each other in a loop: {[str(p) for p in _seen]}")
    data = load_toml(path)
    name = data.get("name", path.stem)
    base = data.pop("base", None)
    if base is not None:
        data = _merge(
            {
                k: v
                for k, v in load_toml_with_base(path.parent / base, _seen + (path,)).items()
                if k != "name"
            },
            data,
        )
    data["name"] = name
    return data


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise MfdetrError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise MfdetrError(f"override {item!r}: {p!r} is a value, not a table")
            node = nxt
        node[parts[-1]] = _parse_value(text.strip())
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise MfdetrError(f"config {where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except MfdetrError as e:
                errors.append(str(e))
        raise MfdetrError(errors[0] if errors else f"config {where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MfdetrError(f"config {where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise MfdetrError(f"config {where}: expected a table, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise MfdetrError(f"config {where}: {value!r} is not one of {list(args)}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path:
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise MfdetrError(f"config {where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming the valid ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise MfdetrError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict of TOML/JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, updated by the TOML file at ``path`` and then by ``overrides``."""
    data = load_toml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)
