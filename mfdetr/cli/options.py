"""What several commands share: the option tables' row type and the decorator that turns a table into a
command's typer options, the options more than one command declares (declared once, with their help text),
and small parsing and printing helpers.

A command declares its options as a table of ``Opt`` rows (one row = one option: name, type, default,
help) and receives them as keyword arguments; where a table mirrors a config dataclass, the command builds
the config from the same rows, so adding an option is one row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Opt:
    """One command-line option. ``flag`` defaults to ``--name-with-dashes``; a bool pair is spelled
    ``"--x/--no-x"``; ``default=...`` makes the option required."""

    name: str
    type: Any
    default: Any
    help: str
    flag: str = ""
    min: float | None = None
    max: float | None = None

    def parameter(self) -> inspect.Parameter:
        decl = typer.Option(
            self.flag or "--" + self.name.replace("_", "-"), help=self.help, min=self.min, max=self.max
        )
        kind = inspect.Parameter.KEYWORD_ONLY
        return inspect.Parameter(self.name, kind, default=self.default, annotation=Annotated[self.type, decl])


def with_options(*tables: Sequence[Opt]) -> Callable[[F], F]:
    """Decorator: the options of ``tables`` (in order) follow the command's own parameters (its
    arguments) in the signature typer reads; the command receives them in its ``**kwargs``."""

    def wrap(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        func.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=own + [o.parameter() for table in tables for o in table]
        )
        return func

    return wrap


def pick(values: Mapping[str, Any], table: Sequence[Opt]) -> dict[str, Any]:
    """The values of the options of ``table``, by name (to build the config that table mirrors)."""
    return {o.name: values[o.name] for o in table}


# `extract` and `run` both refuse to fill a disk
FORCE = Opt("force", bool, False, "Extract even when a cache's estimated size exceeds its disk's free space.")
# evaluate and predict paste masks the same way
MASK_THRESHOLD = Opt(
    "mask_threshold", float, 0.5, "Probability threshold of the pasted masks.", min=0.0, max=1.0
)
# the store argument of `cache info` and `cache verify`
StorePath = Annotated[str, typer.Argument(help="Cache store path or fsspec URL.")]


def comma_list(text: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped); None when the option was not given."""
    if not text:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def echo_warnings(warnings: Iterable[str]) -> None:
    """One ``warning: ...`` line on stderr per warning of an API result."""
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
