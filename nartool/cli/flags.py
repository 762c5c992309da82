"""Mutually exclusive mode flags (``store query --references|--size|…``, ``nar hash
--base16|--sri|…``): giving two different ones is a usage error, as in ``nix-store -q``
("query type '--size' conflicts with earlier flag"); repeating the same one is fine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def mode_flags(key: str, what: str, flags: list[tuple[tuple[str, ...], str, str]]) -> Callable[[F], F]:
    """Add one boolean option per ``(declarations, value, help)``; the command reads the chosen
    value with :func:`chosen_mode` (``None`` when none was given). ``what`` names the kind of
    flag in the error ("query type", "hash format")."""

    def make(decls: tuple[str, ...], value: str, help_: str) -> Callable[[F], F]:
        shown = next((d for d in decls if d.startswith("--")), decls[0])

        def callback(ctx: click.Context, param: click.Parameter, given: bool) -> None:
            if not given:
                return
            # click processes the options in command-line order: the first one recorded is the earlier
            earlier = ctx.meta.get(f"nartool.mode.{key}")
            if earlier is not None and earlier[0] != value:
                raise click.UsageError(f"{what} '{shown}' conflicts with earlier flag '{earlier[1]}'", ctx)
            ctx.meta[f"nartool.mode.{key}"] = (value, shown)

        return click.option(*decls, f"mode_{key}_{value}".replace("-", "_"), is_flag=True, expose_value=False,
                            callback=callback, help=help_)

    def deco(f: F) -> F:
        for decls, value, help_ in reversed(flags):
            f = make(decls, value, help_)(f)
        return f

    return deco


def chosen_mode(ctx: click.Context, key: str, default: str) -> str:
    got = ctx.meta.get(f"nartool.mode.{key}")
    return default if got is None else str(got[0])
