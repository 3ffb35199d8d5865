"""Errors the command line shows as a message (never a traceback)."""

import difflib


class UserError(Exception):
    """A problem with the user's input or files, explained in the message."""


def unknown_name(kind: str, name: str, known) -> UserError:
    """A UserError for an unknown name, suggesting the closest known ones."""
    close = difflib.get_close_matches(name, list(known), n=4, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown {kind} {name!r}{hint}")
