"""Errors that every room raises: a leaf module, imported from anywhere, importing nothing."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration field is missing or wrong; the message names it."""
