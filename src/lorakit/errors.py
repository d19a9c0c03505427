"""User-facing errors. Every message names the thing at fault: a key, a shape, a file, a field."""

from __future__ import annotations


class LoraError(ValueError):
    """Any error a lorakit user can cause and fix (bad config, bad file, wrong model)."""


class AdapterFileError(LoraError):
    """An adapter folder or file is missing, corrupt, unsafe (pickle), or does not fit the model."""


class TargetError(LoraError):
    """Target patterns match nothing, or match a module lorakit cannot wrap."""


class AdapterChangedError(AdapterFileError):
    """An adapter's files no longer hold the bytes that were checked when it was registered."""
