"""FHIR R4 search rules shared by every search route: no parameter is silently ignored.

R4 search.html 3.1.1.5 (`Prefer: handling=strict|lenient`): a parameter the server does not
support is an error (400) unless the client asked for lenient handling — then it is ignored
and left out of the `self` link, which shows the search actually performed. Date parameters
with prefixes (3.1.1.4.2, 3.1.1.4.3) and `_count` are read here, once, for all routes.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from sqlalchemy import ColumnElement, DateTime, Select, and_, or_
from sqlalchemy.orm import Session

from fhirbridge.fhir.outcome import FhirError

MAX_COUNT = 1000
DEFAULT_COUNT = 100
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")
# Result parameters every search route accepts (values checked by the route where it matters)
RESULT_PARAMETERS = frozenset({"_count", "_format"})


def patient_reference(value: str) -> str:
    """A reference search value as `Patient/{id}`: from `Patient/{id}`, a bare id or an
    absolute URL (R4 search.html 3.1.1.4.6)."""
    value = value.split("/fhir/")[-1].split("/_history")[0]
    return value if value.startswith("Patient/") else f"Patient/{value}"


def lenient(request: Request) -> bool:
    """`Prefer: handling=lenient` asked for. The default is strict: HAPI FHIR JPA and medplum
    both answer an unknown search parameter with 400."""
    for part in request.headers.get("prefer", "").replace(",", ";").split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "handling":
            return value.strip().strip('"').lower() == "lenient"
    return False


def supported_parameters(request: Request, known: frozenset[str] | set[str]
                         ) -> list[tuple[str, str]]:
    """The query's (name, value) pairs this route supports. Any other name: 400 naming it, or,
    with `Prefer: handling=lenient`, dropped (and so absent from the self link)."""
    allowed = set(known) | RESULT_PARAMETERS
    kept, unknown = [], []
    for key, value in request.query_params.multi_items():
        (kept if key in allowed else unknown).append((key, value))
    if unknown and not lenient(request):
        names = ", ".join(sorted({k[:40] for k, _ in unknown})[:5])
        raise FhirError(400, "not-supported", f"unsupported search parameter(s): {names}; "
                        f"supported: {', '.join(sorted(allowed))} (or send "
                        "Prefer: handling=lenient to have unknown ones ignored)")
    return kept


def self_link(base: str, resource_type: str, kept: list[tuple[str, str]]) -> str:
    """The search as performed (R4 search.html 3.1.1.5: ignored parameters left out)."""
    query = urlencode(kept)
    return f"{base}/{resource_type}" + (f"?{query}" if query else "")


def count_of(kept: list[tuple[str, str]]) -> int:
    """`_count` (0 = only the total), bounded by MAX_COUNT."""
    raw = next((v for k, v in kept if k == "_count"), None)
    if raw is None:
        return DEFAULT_COUNT
    try:
        n = int(raw)
    except ValueError:
        raise FhirError(400, "invalid", "_count must be a whole number",
                        expression="_count") from None
    if n < 0:
        raise FhirError(400, "invalid", "_count must not be negative", expression="_count")
    return min(n, MAX_COUNT)


def values_of(kept: list[tuple[str, str]], name: str) -> list[list[str]]:
    """Each occurrence of `name` as its comma-separated values (AND between occurrences, OR
    within one, R4 search.html 3.1.1.4); an empty value is a 400."""
    out = []
    for key, value in kept:
        if key == name:
            values = [v for v in value.split(",") if v]
            if not values:
                raise FhirError(400, "invalid", f"{name} needs a value", expression=name)
            out.append(values)
    return out


def date_range(value: str, name: str = "date") -> tuple[datetime, datetime]:
    """The instant range a FHIR date/dateTime value covers (R4 search.html 3.1.1.4.2.5)."""
    try:
        if len(value) == 4:
            start = datetime(int(value), 1, 1, tzinfo=timezone.utc)
            return start, start.replace(year=start.year + 1)
        if len(value) == 7:
            start = datetime.strptime(value, "%Y-%m").replace(tzinfo=timezone.utc)
            return start, (start + timedelta(days=32)).replace(day=1)
        if len(value) == 10:
            start = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
            return start, start + timedelta(days=1)
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FhirError(400, "invalid", f"{name} must be a FHIR date or dateTime, optionally "
                        "prefixed with eq, ne, gt, lt, ge or le", expression=name) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    at = at.astimezone(timezone.utc)
    # the value's own precision is the range (3.1.1.4.2.5): 18:00:00.123Z covers a millisecond,
    # so `gt` a resource's meta.lastUpdated (ms) leaves that resource out
    time = re.search(r"T\d\d:\d\d(:\d\d(?:\.(\d+))?)?", value)
    if time is None or time.group(1) is None:
        step = timedelta(minutes=1) if time else timedelta(seconds=1)
    else:
        digits = len(time.group(2) or "")
        step = timedelta(microseconds=10 ** (6 - min(digits, 6))) if digits else \
            timedelta(seconds=1)
    return at, at + step


def date_clause(column: Any, raw: str, name: str = "date") -> ColumnElement[bool]:
    """A date search value with its prefix (default eq) as a condition on `column` (stored in
    UTC)."""
    prefix, value = ("eq", raw)
    if raw[:2] in _PREFIXES:
        prefix, value = raw[:2], raw[2:]
    start, end = date_range(value, name)
    return {"ge": column >= start, "gt": column >= end, "le": column < end,
            "lt": column < start, "eq": (column >= start) & (column < end),
            "ne": (column < start) | (column >= end)}[prefix]


def _after(keys: list[Any], values: list[Any], descending: bool) -> ColumnElement[bool]:
    """Rows strictly beyond `values` in the (keys…) order: (k1 < v1) or (k1 = v1 and k2 < v2)
    when descending (> when ascending)."""
    head, value = keys[0], values[0]
    beyond = head < value if descending else head > value
    if len(keys) == 1:
        return beyond
    return or_(beyond, and_(head == value, _after(keys[1:], values[1:], descending)))


def _encode(direction: str, values: list[Any]) -> str:
    raw = json.dumps([direction] + [v.isoformat() if isinstance(v, datetime) else v
                                    for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode(raw: str, keys: list[Any]) -> tuple[str, list[Any]]:
    try:
        direction, *values = json.loads(base64.urlsafe_b64decode(raw.encode()).decode())
        if direction not in ("n", "p") or len(values) != len(keys):
            raise ValueError(raw)
        out = [datetime.fromisoformat(v) if isinstance(k.type, DateTime) else str(v)
               for k, v in zip(keys, values)]
    except (ValueError, TypeError, UnicodeDecodeError):
        raise FhirError(400, "invalid", "_cursor is not one this server gave",
                        expression="_cursor") from None
    return direction, out


def keyset_page(session: Session, query: Select[Any], keys: list[Any], descending: bool,
                kept: list[tuple[str, str]], count: int,
                key_of: Callable[[Any], list[Any]]) -> tuple[list[Any], str | None,
                                                             str | None]:
    """One page of `query` in the order of `keys` (the last one unique), after or before the
    `_cursor` of the request: (rows, next cursor, previous cursor). Keyset paging, not
    offsets: rows added meanwhile never shift a page, so following `next` (or `previous`)
    links neither repeats nor skips a row that existed (R4 search.html 3.1.1.6 paging)."""
    if count <= 0:
        return [], None, None
    raw = next((v for k, v in kept if k == "_cursor"), None)
    direction, values = _decode(raw, keys) if raw else ("n", None)
    backwards = direction == "p"
    order_desc = descending != backwards
    q = query
    if values is not None:
        q = q.where(_after(keys, values, order_desc))
    q = q.order_by(*[k.desc() if order_desc else k.asc() for k in keys]).limit(count + 1)
    rows = list(session.execute(q))
    more = len(rows) > count
    rows = rows[:count]
    if backwards:
        rows.reverse()
    if not rows:
        return [], None, None
    has_next = more if not backwards else True
    has_prev = (values is not None) if not backwards else more
    nxt = _encode("n", key_of(rows[-1])) if has_next else None
    prev = _encode("p", key_of(rows[0])) if has_prev else None
    return rows, nxt, prev


def page_links(base: str, resource_type: str, kept: list[tuple[str, str]],
               nxt: str | None, prev: str | None) -> list[dict[str, str]]:
    """The `next` / `previous` links of a searchset: the same search with another cursor."""
    params = [(k, v) for k, v in kept if k != "_cursor"]
    return [{"relation": rel, "url": self_link(base, resource_type, params + [("_cursor", c)])}
            for rel, c in (("next", nxt), ("previous", prev)) if c]
