"""Errors the command line shows as a message (never a traceback)."""

import difflib


class UserError(Exception):
    """A problem with the user's input or files, explained in the message."""


def unknown_name(kind: str, name: str, known) -> UserError:
    """A UserError for an unknown name, suggesting the closest known ones."""
    close = difflib.get_close_matches(name, list(known), n=4, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown {kind} {name!r}{hint}")


def message_of(error: UserError) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch re-raises it in the main
    process as 'Caught X in DataLoader worker process N' followed by the worker's traceback."""
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    return text.rpartition(marker)[2].strip() if marker in text else text.strip().splitlines()[-1]
