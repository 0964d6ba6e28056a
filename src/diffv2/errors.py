"""Errors a user can act on.

Every error raised for bad input derives from :class:`DiffV2Error`; the CLI prints such errors as one line
(no traceback) and exits with status 2. Config errors are also ``ValueError``s so plain Python callers can
catch them the usual way.
"""

from __future__ import annotations


class DiffV2Error(Exception):
    """Base class for errors caused by user input (configs, files, flags), not by bugs."""


class ConfigError(DiffV2Error, ValueError):
    """A configuration field has an invalid value; the message names the field and the rule."""


class DataError(DiffV2Error, ValueError):
    """A data file (shard, manifest, tokenizer, corpus source) is missing, truncated or inconsistent."""


class CheckpointError(DiffV2Error, ValueError):
    """A checkpoint is missing, truncated, corrupted, or does not match the run it is loaded into."""
