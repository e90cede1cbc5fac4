"""Text that bonefrac writes from what a user gave it (file names, folder names, groups, study ids), made harmless.

    neutralise_csv(row)   a CSV row (dict or sequence) whose cells a spreadsheet shows as text, never runs
    restore_csv(record)   what neutralise_csv changed, undone: for bonefrac reading back a CSV it wrote
    terminal_safe(text)   control characters shown as escapes, rich markup escaped: for the terminal

CSV injection (OWASP): a spreadsheet runs a cell that starts with =, +, -, @, tab or carriage return as a formula
(`=HYPERLINK(...)` in a file name is enough), so such a cell gets a leading single quote. Numbers are left as they
are ("-0.5" is a number, not a formula), and a cell that already starts with a quote gets one more, so that
`restore_csv` gives back exactly what was written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, overload

from rich.markup import escape

_FORMULA_START = frozenset("=+-@\t\r")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# C0 controls, DEL and C1 controls: an ESC in a file name can move the cursor, recolour or retitle a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _neutralise(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if value[0] == "'" or (value[0] in _FORMULA_START and not _NUMBER.fullmatch(value)):
        return "'" + value
    return value


@overload
def neutralise_csv(row: Mapping[str, Any]) -> dict[str, Any]: ...
@overload
def neutralise_csv(row: Sequence[Any]) -> list[Any]: ...
def neutralise_csv(row):
    """A CSV row with every text cell that a spreadsheet would run as a formula prefixed with a single quote."""
    if isinstance(row, Mapping):
        return {key: _neutralise(value) for key, value in row.items()}
    return [_neutralise(value) for value in row]


def restore_csv(record: Mapping[str, str]) -> dict[str, str]:
    """A row of a CSV that bonefrac wrote, as it was before neutralise_csv (csv.DictReader's dict)."""
    return {key: value[1:] if isinstance(value, str) and value.startswith("'") else value
            for key, value in record.items()}


def terminal_safe(text: str) -> str:
    """`text` for a rich console: control characters as \\x1b-style escapes, [markup] escaped."""
    return escape(_CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", str(text)))
