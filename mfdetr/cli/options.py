"""What several commands share: typer option declarations (declared once, with their help text) and
small parsing and printing helpers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer

# evaluate and predict paste masks the same way
MaskThreshold = Annotated[
    float,
    typer.Option("--mask-threshold", min=0.0, max=1.0, help="Probability threshold of the pasted masks."),
]
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
