"""JSON from files qconvert did not write (config.json, safetensors headers, container metadata).

``json.loads`` trusts its input: it recurses once per nesting level (a RecursionError 100,000
levels down), accepts ``NaN`` / ``Infinity`` (which no JSON writer may write back), silently
keeps the last of two equal keys, and turns a few bytes of text into tens of bytes of Python
objects. :func:`loads` refuses all of that with one :class:`QConvertError` sentence, and refuses
text whose objects would take more than a memory budget before it parses anything.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import QConvertError

MAX_DEPTH = 64
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Upper bound on the bytes of Python objects one JSON value takes (a str, float, list or dict
# entry with its pointer: 30-70 bytes; a small int 8). Values are counted by their separators.
OBJECT_BYTES = 80
DEFAULT_BUDGET = 512 << 20


def object_bytes(text: bytes | str | memoryview) -> int:
    """An upper bound on the memory ``json.loads(text)`` allocates, from a linear scan (a
    memoryview, e.g. of a memory-mapped file, is scanned 16 MiB at a time, never copied whole)."""
    if isinstance(text, str):
        count = text.count
        seps = count(",") + count(":") + count("[") + count("{")
        return 4 * len(text) + OBJECT_BYTES * (seps + 1)
    view = memoryview(text).cast("B")
    seps = 0
    for start in range(0, len(view), 16 << 20):
        piece = bytes(view[start : start + (16 << 20)]) if not isinstance(text, bytes) else text[start : start + (16 << 20)]
        seps += piece.count(b",") + piece.count(b":") + piece.count(b"[") + piece.count(b"{")
    return 4 * len(view) + OBJECT_BYTES * (seps + 1)


class JSONRefused(QConvertError):
    """Untrusted JSON refused; ``reason`` is the sentence without the name of the JSON."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} {reason}")
        self.reason = reason


class Budget:
    """Memory several JSON values of one file may take together; each :func:`loads` spends some."""

    def __init__(self, limit: int = DEFAULT_BUDGET) -> None:
        self.limit = self.left = limit


def _no_constant(name: str) -> Any:
    raise _NonFinite(name)


class _NonFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise _NonFinite(text)
    return value


class _Duplicate(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


def depth_exceeds(value: Any, limit: int) -> bool:
    """True when lists/dicts nest more than ``limit`` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads(text: bytes | str | memoryview, what: str, budget: int | Budget = DEFAULT_BUDGET,
          max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON (UTF-8 bytes or str); ``what`` names it in the error sentence.
    ``budget``: the bytes of Python objects it may become (a :class:`Budget` is spent)."""
    cost = object_bytes(text)  # before any copy: a refused text is never copied whole
    left = budget.left if isinstance(budget, Budget) else budget
    if cost > left:
        limit = budget.limit if isinstance(budget, Budget) else budget
        raise JSONRefused(
            what, f"is too large to load: {len(text):,} bytes of JSON would take about {cost >> 20:,} MiB"
            f" in memory" + (" with the rest of the file's JSON" if left < limit else "")
            + f" (qconvert's limit is {limit >> 20:,} MiB)"
        )
    if isinstance(budget, Budget):
        budget.left -= cost
    if isinstance(text, (memoryview, bytearray)):
        text = bytes(text)
    if isinstance(text, bytes):
        try:
            text = str(text, "utf-8")
        except UnicodeDecodeError as e:
            raise JSONRefused(what, f"is not UTF-8 text (bad byte at offset {e.start})") from None
    # nesting deeper than max_depth needs more than max_depth opening brackets
    deep_possible = text.count("[") + text.count("{") > max_depth
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_pairs)
    except _NonFinite as e:
        raise JSONRefused(what, f"holds the number {e.args[0]}, which JSON does not allow (NaN and infinities have no JSON form)") from None
    except _Duplicate as e:
        raise JSONRefused(what, f"has the key {e.args[0]!r} twice") from None
    except RecursionError:
        raise JSONRefused(what, f"nests more than {max_depth} levels deep") from None
    except json.JSONDecodeError as e:
        raise JSONRefused(what, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise JSONRefused(what, f"is not usable JSON ({str(e).splitlines()[0][:100]})") from None
    if deep_possible and depth_exceeds(value, max_depth):
        raise JSONRefused(what, f"nests more than {max_depth} levels deep")
    if _SURROGATE_ESCAPE.search(text):  # "\ud800" alone parses, but is no Unicode text: it cannot be written back
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise JSONRefused(what, f"holds the lone surrogate \\u{ord(e.object[e.start]):04x}, which is not Unicode text") from None
    return value


def load_object(text: bytes | str, what: str, budget: int | Budget = DEFAULT_BUDGET) -> dict[str, Any]:
    """Like :func:`loads`, for text that must hold one JSON object."""
    value = loads(text, what, budget)
    if not isinstance(value, dict):
        raise JSONRefused(what, f"is not a JSON object (it holds a {type(value).__name__})")
    return value


MAX_FILE = 128 << 20  # a JSON file of a checkpoint folder (tokenizer.json is the largest, ~30 MB)


def read_file(path: Path, what: str, limit: int = MAX_FILE) -> bytes:
    """The bytes of a JSON file, refusing one too large to hold in memory."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # never more, whatever the file claims or becomes
    except OSError as e:
        raise QConvertError(f"cannot read {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise QConvertError(f"{what} is over {limit >> 20} MiB; qconvert reads JSON files of at most {limit >> 20} MiB")
    return data


def load_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object (config.json, tokenizer_config.json ...)."""
    return load_object(read_file(path, what), what)
