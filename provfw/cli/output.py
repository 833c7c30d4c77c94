"""How ``provfw`` prints what a command returns, in three modes.

* ``table`` (for people): aligned columns under a header; a mutation prints its
  one-line answer instead; one object (``rule-show``) prints as field/value lines.
* ``json`` (for programs): the API's complete answer, indented, keys sorted.
* ``value`` (for shell scripts): bare values, one row a line, tab separated,
  no header, in the declared column order; nothing at all for no rows.

In ``table`` and ``value`` an empty value (None, "", []) prints as ``-`` and a
tab, newline or other control character inside a value prints escaped
(``\\t``), so every row stays one line with a fixed number of fields.

Pure functions over values: nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

from provfw.adminclient import dumps

MODES = ("table", "json", "value")
EMPTY = "-"

_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7f)}
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a command's output.

    ``name`` is the header, the name ``-c`` selects, and (unless ``get`` is given)
    the key read from each row.  ``get(row)`` derives a value.  A column with
    ``requires`` is left out of the default columns when no row has that key
    (an API that does not report the field yet), and prints ``-`` when selected.
    """

    name: str
    get: Callable[[Mapping[str, Any]], Any] | None = None
    requires: str | None = None

    def value(self, row: Mapping[str, Any]) -> Any:
        return self.get(row) if self.get is not None else row.get(self.name)


@dataclasses.dataclass(frozen=True)
class Result:
    """What a command answers; the output mode decides which parts print.

    ``payload``: what ``-o json`` prints (the API's answer, complete).
    ``rows``: what ``table`` and ``value`` print, through the command's columns.
    ``message``: a mutation's one-line answer; ``table`` prints it, then ``details``
    (one line each), instead of a table, unless columns were chosen with ``-c``.
    ``record``: the rows are one object; ``table`` prints it as field/value lines.
    ``empty``: what ``table`` prints when there are no rows.
    ``heading``: a line ``table`` prints above the rows (and ``details`` below them), for an answer that is
    both a sentence and a table (``provfw why``).
    ``failed``: the answer printed is a failure all the same (an import whose every entry was refused): the
    CLI says this on stderr after the output and exits 1.
    """

    payload: Any
    rows: Sequence[Mapping[str, Any]]
    message: str | None = None
    details: Sequence[str] = ()
    record: bool = False
    empty: str = "(none)"
    heading: str | None = None
    failed: str | None = None


def cell(value: Any) -> str:
    """One value as a single line of text; ``-`` when empty."""
    if value is None or value == "" or value == [] or value == {}:
        return EMPTY
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(item) for item in value)
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value).translate(_ESCAPES)


def visible_columns(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]],
                    selected: Sequence[str] | None = None) -> list[Column]:
    """The columns to print: ``selected`` (names, in that order) or the declared ones present in ``rows``.

    Raises ValueError naming the unknown column and the known ones.
    """
    if selected:
        by_name = {column.name: column for column in columns}
        unknown = [name for name in selected if name not in by_name]
        if unknown:
            raise ValueError(f"unknown column {unknown[0]!r} (choose from {', '.join(by_name)})")
        return [by_name[name] for name in selected]
    return [c for c in columns if c.requires is None or any(c.requires in row for row in rows)]


def table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    """Aligned text columns, two spaces apart, no trailing blanks."""
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(headers)]
    return ["  ".join(text.ljust(widths[i]) for i, text in enumerate(line)).rstrip()
            for line in (headers, *lines)]


def render(result: Result, columns: Sequence[Column], mode: str = "table",
           selected: Sequence[str] | None = None) -> list[str]:
    """The lines to print for ``result`` in ``mode`` (one of MODES); [] prints nothing."""
    if mode == "json":
        return dumps(result.payload).splitlines()
    shown = visible_columns(columns, result.rows, selected)
    cells = [[cell(column.value(row)) for column in shown] for row in result.rows]
    if mode == "value":
        return ["\t".join(line) for line in cells]
    if mode != "table":
        raise ValueError(f"unknown output mode {mode!r}")
    if result.message is not None and not selected:
        return [result.message, *result.details]
    if result.record:
        names = [column.name for column in shown]
        width = max(len(name) for name in names)
        return [f"{name.ljust(width)}  {value}".rstrip() for line in cells for name, value in zip(names, line)] + \
            list(result.details)
    if not cells:
        return [result.empty]
    if result.heading is not None:
        return [result.heading, *table([column.name for column in shown], cells), *result.details]
    return table([column.name for column in shown], cells)
