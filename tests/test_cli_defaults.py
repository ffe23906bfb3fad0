"""The CLI keeps its imports light, so `mfdetr extract` spells its defaults out: they must be the API's."""

import dataclasses

import typer

from mfdetr.cache.schema import ExtractOptions
from mfdetr.cli import app


def _defaults(command: str) -> dict:
    cmd = typer.main.get_command(app).commands[command]
    return {p.name: p.default for p in cmd.params}


def test_extract_option_defaults_are_the_api_defaults():
    cli = _defaults("extract")
    api = {
        f.name: f.default for f in dataclasses.fields(ExtractOptions) if f.default is not dataclasses.MISSING
    }
    shared = sorted(set(cli) & set(api))
    assert {"codec", "codec_level", "dtype", "topk", "mask_size", "keepbits"} <= set(shared)
    for name in shared:
        assert cli[name] == api[name], (
            f"--{name.replace('_', '-')}: CLI default {cli[name]!r} != API {api[name]!r}"
        )
