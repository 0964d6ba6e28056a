"""Command-line flags made from dataclass fields: the name, the type, the one-line help and the choices come from
the field (``diffv2.config.described``), and the default shown is the value the command really uses."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any


def field_help(f: dataclasses.Field) -> str:
    """The field's one-line description (empty when it has none)."""
    return str(f.metadata.get("help", ""))


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The values an enum-like field accepts; a registry (a dict filled as variants register) gives its keys."""
    choices = f.metadata.get("choices")
    return tuple(choices) if choices is not None else None


def add_field_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    shown_defaults: Mapping[str, Any],
    *,
    skip: set[str] = frozenset(),
    note: Mapping[str, str] | None = None,
) -> list[str]:
    """One ``--name`` flag per field of ``cls`` (bool fields: ``--name`` / ``--no-name``), in a group titled
    ``title``; every flag defaults to None so the caller can tell a given flag from an omitted one. The help
    shows ``shown_defaults[name]`` (and ``note[name]``, e.g. where that default comes from). Returns the names."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        choices = field_choices(f)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices is not None:
            kwargs["choices"] = choices
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            kwargs["type"] = base if base in (int, float) else str
            kwargs["metavar"] = f.name.upper()
        default = shown_defaults.get(f.name)
        suffix = f", {note[f.name]}" if note and f.name in note else ""
        help_text = f"{field_help(f)} (default: {_show(default)}{suffix})"
        # a group's add_argument is not the parser's, which adds the other spelling: add it here
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        group.add_argument(*flags, help=help_text.replace("%", "%%"), **kwargs)
        names.append(f.name)
    return names


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def path_arg(text: str):
    """An argparse ``type`` for path flags: ``Path(text)``, refusing the empty string (``Path("")`` would be the
    current folder, which the user did not name)."""
    from pathlib import Path

    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return Path(text)


def add_kv_cache_dtype_flag(p: argparse.ArgumentParser) -> None:
    """``--kv-cache-dtype`` of the decoding commands; the choices are ``diffv2.generate.cache.KV_DTYPES`` (not
    imported here: it would load torch for ``--help``; tests/test_cli_generate.py holds them equal)."""
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="KV cache storage: auto = the model's dtype; int8 = int8 with a scale per cached vector, about half "
        "the bytes of bf16 (default: %(default)s)",
    )
