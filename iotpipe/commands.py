"""Lazy command groups: a command's module is imported only when that command runs.

A group lists its commands as a table of :class:`LazyCommand` entries (``"module:attr"`` and
the one-line summary its help listing shows). ``iotpipe --help`` renders the table without
importing anything; ``iotpipe bridge ...`` imports ``bridge.cli`` and nothing else. The target
is either a typer command function or a :class:`typer.Typer` (a nested group).

Keep each summary equal to the first paragraph of the command's docstring:
``tests/iotpipe/test_cli.py`` loads every target and compares.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, cast

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["LazyCommand", "LazyGroup", "load_command"]


class LazyCommand(NamedTuple):
    """One entry of a lazy command table.

    Attributes:
        target: ``"package.module:attr"``; attr is a typer command function or a Typer app.
        summary: the line shown in the group's command list (the docstring's first paragraph).
    """

    target: str
    summary: str


def load_command(name: str, target: str) -> TyperCommand | TyperGroup:
    """Import ``target`` and turn it into the click command ``name``."""
    module_name, _, attr = target.partition(":")
    obj: Any = getattr(importlib.import_module(module_name), attr)
    if isinstance(obj, typer.Typer):
        group = typer.main.get_group(obj)
        group.name = name
        return group
    single = typer.Typer(
        rich_markup_mode="rich", pretty_exceptions_enable=False, add_completion=False
    )
    single.command(name)(obj)
    return cast("TyperCommand", typer.main.get_command(single))


class LazyGroup(TyperGroup):
    """A typer group whose commands from :attr:`lazy_commands` load on first use.

    Subclass it with the table and pass the subclass as ``typer.Typer(cls=...)``. Commands
    registered the usual way (``@app.command()``) come first, then the table in its order.
    While help is rendered, lazy commands are stand-ins carrying only their summary.
    """

    lazy_commands: ClassVar[Mapping[str, LazyCommand]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loaded: dict[str, TyperCommand | TyperGroup] = {}
        self._listing = False

    # typer vendors click (typer._click) without a public name for its Context and
    # HelpFormatter, hence the Any parameters below.

    def list_commands(self, ctx: Any) -> list[str]:
        """Eager commands, then the lazy table."""
        eager = [name for name in self.commands if name not in self.lazy_commands]
        return eager + list(self.lazy_commands)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command ``cmd_name``, imported now unless only its summary is wanted."""
        entry = self.lazy_commands.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        if cmd_name in self._loaded:
            return self._loaded[cmd_name]
        if self._listing:
            return TyperCommand(cmd_name, help=entry.summary, short_help=entry.summary)
        command = self._loaded[cmd_name] = load_command(cmd_name, entry.target)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """The group's help, listing lazy commands by their summaries (nothing imported)."""
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False
