"""Frozen detectors: the protocol, the spec registry and the adapters."""
