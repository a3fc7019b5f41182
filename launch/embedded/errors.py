"""The errors raised while fetching, verifying and converting embedded models."""

from __future__ import annotations


class EmbeddedModelError(RuntimeError):
    """A problem with an embedded model source, worded for the person running `make setup`."""


class HashMismatchError(EmbeddedModelError):
    pass
