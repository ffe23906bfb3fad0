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


def test_option_tables_build_their_configs():
    """A command builds its config from its option table: every row must be a field of that config, with
    the config's default (train's overrides default to None: not given = the TOML's value)."""
    import inspect

    from mfdetr.cli import evaluate, extract, predict, train
    from mfdetr.evaluate.config import EvalConfig, PredictConfig
    from mfdetr.extract.loop import extract as extract_api
    from mfdetr.train.config import TrainConfig

    for table, config in ((evaluate.CONFIG, EvalConfig), (predict.CONFIG, PredictConfig)):
        fields = {f.name: f.default for f in dataclasses.fields(config)}
        for o in table:
            assert o.name in fields, f"{config.__name__} has no field {o.name}"
            assert o.default == fields[o.name], f"--{o.name}: {o.default!r} != {fields[o.name]!r}"
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {o.name for o in train.OVERRIDES} <= train_fields
    assert all(o.default in (None, False) for o in train.OVERRIDES)
    storage = {f.name for f in dataclasses.fields(ExtractOptions)} | {"iou_threshold"}  # match: MatchOptions
    assert {o.name for o in extract.STORAGE} <= storage
    run_kwargs = set(inspect.signature(extract_api).parameters)
    assert {o.name for o in extract.RUN} - {"no_progress"} <= run_kwargs


def test_each_option_is_declared_once_per_command():
    """The tables of one command do not repeat a name or a flag (typer would silently keep one)."""
    for name, cmd in typer.main.get_command(app).commands.items():
        params = getattr(cmd, "params", [])
        flags = [f for p in params for f in (*p.opts, *p.secondary_opts) if f.startswith("-")]
        assert len(flags) == len(set(flags)), f"{name}: {flags}"
        assert len({p.name for p in params}) == len(params), name
