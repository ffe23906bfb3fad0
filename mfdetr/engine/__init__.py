"""Engines: the loops behind the CLI commands (extract, train, evaluate, predict, pipeline)."""
