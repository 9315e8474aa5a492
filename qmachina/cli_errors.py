"""How every ``qmachina`` command fails: one plain ``error: ...`` line on stderr, exit code 2."""

from __future__ import annotations

import sys

import typer

from qmachina.settings import Settings, SettingsError, load_settings


def fail(message: str) -> typer.Exit:
    """The exit to raise; the message is plain text, never wrapped, because error lines name
    files and are read by people and by scripts."""
    sys.stderr.write(f"error: {message}\n")
    return typer.Exit(code=2)


def settings_or_fail() -> Settings:
    """The settings, or a clear exit naming the setting at fault."""
    try:
        return load_settings()
    except SettingsError as error:
        raise fail(str(error)) from None
