"""Errors that reach the user: what was wrong, where, and what to do."""

from __future__ import annotations


class PreftuneError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, hint: str | None = None) -> None:
        self.path, self.line, self.field, self.hint = path, line, field, hint
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "")
        if field is not None:
            where = f"{where} field '{field}'" if where else f"field '{field}'"
        text = f"{where}: {message}" if where else message
        if hint:
            text = f"{text}\n  hint: {hint}"
        self.message = message
        super().__init__(text)
