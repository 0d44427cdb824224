"""Lists too long to count or to skip through (keys, request logs): keyset cursors for the
API and the console, and the console's uncounted paginator.

A list ordered newest first on `(column, primary key)`, both descending, can resume after
any row: the rows that follow `(t, id)` are those with `column < t`, or `column = t` and a
smaller id. The database seeks to that point on the index that serves the order and reads
one page from there, so page 20,000 costs what page 2 costs. An offset (`LIMIT 50 OFFSET
999950`) reads and throws away every row before the page: its cost grows with the depth.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode

from django.contrib.admin.views.main import PAGE_VAR
from django.core.exceptions import ValidationError
from django.db.models import Field, Model, QuerySet
from django.http import QueryDict
from unfold import paginator
from unfold.views import ChangeList

AFTER_VAR = "after"  # the console's "next": the page starts after this row
BEFORE_VAR = "before"  # the console's "previous": the page ends before this row


class BadCursor(ValueError):
    """A cursor that this list did not make (edited, truncated, or another list's)."""


@dataclass(frozen=True)
class Keyset:
    """The order `-column, -pk` of a list, and cursors that resume it.

    `column` may hold NULL (a key never used): MySQL, MariaDB and SQLite sort NULL below
    every value, so in this descending order those rows come last, by id. Their rows are
    read by a second query of their own, so that each query is one range of the index.
    """

    column: str

    # A page's ids are read first, then its rows (`_read`): the ids come off the index
    # alone, so MariaDB takes the index that holds every column of the query (a group's
    # `(group, column, id)`), where for whole rows it took `(column, id)` and looked up
    # each row to check its group, or sorted the whole NULL part. In the NULL part the
    # column is constant, so the order is by id alone.

    @property
    def order(self) -> tuple[str, str]:
        return (f"-{self.column}", "-pk")

    def serves(self, rows: QuerySet[Any]) -> bool:
        """Whether `rows` are in this order (a console list sorted by another column is not)."""
        pk = f"-{rows.model._meta.pk.name}"
        # The admin may name a column twice (the model's ordering, then its own).
        order = dict.fromkeys("-pk" if name == pk else name for name in rows.query.order_by)
        return tuple(order) == self.order

    def cursor(self, row: Model) -> str:
        """The position just after `row`, as an opaque URL-safe string."""
        value = getattr(row, self.column)
        raw = json.dumps([None if value is None else value.isoformat(), str(row.pk)])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def position(self, model: type[Model], cursor: str) -> tuple[Any, Any]:
        """`(column value, pk)` of a cursor; raises `BadCursor`."""
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            value, pk = json.loads(raw)
            column = self._field(model, self.column)
            parsed = None if value is None else column.to_python(value)
            if parsed is None and (value is not None or not column.null):
                raise BadCursor(cursor)
            return parsed, model._meta.pk.to_python(pk)
        except (ValueError, TypeError, ValidationError, binascii.Error) as exc:
            raise BadCursor(cursor) from exc

    def after(self, rows: QuerySet[Any], cursor: str | None, limit: int) -> list[Any]:
        """Up to `limit` rows of `rows` that follow the cursor (from the first without one)."""
        rows = rows.order_by(*self.order)
        if not cursor:
            return _read(rows, rows, limit)
        value, pk = self.position(rows.model, cursor)
        name = self.column
        if value is None:  # inside the NULL rows, which come last
            nulls = rows.filter(**{f"{name}__isnull": True, "pk__lt": pk}).order_by("-pk")
            return _read(rows, nulls, limit)
        # `column <= t` is the index range; the ties at t before the cursor are skipped.
        older = rows.filter(**{f"{name}__lte": value}).exclude(**{name: value, "pk__gte": pk})
        found = _read(rows, older, limit)
        if len(found) < limit and self._field(rows.model, name).null:
            nulls = rows.filter(**{f"{name}__isnull": True}).order_by("-pk")
            found += _read(rows, nulls, limit - len(found))
        return found

    def before(self, rows: QuerySet[Any], cursor: str, limit: int) -> list[Any]:
        """Up to `limit` rows of `rows` just before the cursor, in the list's order."""
        value, pk = self.position(rows.model, cursor)
        name = self.column
        rising = rows.order_by(name, "pk")
        found: list[Any] = []
        if value is None:
            nulls = rows.filter(**{f"{name}__isnull": True, "pk__gt": pk}).order_by("pk")
            found = _read(rows, nulls, limit)
            if len(found) < limit:
                used = rising.filter(**{f"{name}__isnull": False})
                found += _read(rows, used, limit - len(found))
        else:
            nearer = rising.filter(**{f"{name}__gte": value}).exclude(
                **{name: value, "pk__lte": pk}
            )
            found = _read(rows, nearer, limit)
        return found[::-1]

    @staticmethod
    def _field(model: type[Model], name: str) -> Field[Any, Any]:
        return cast("Field[Any, Any]", model._meta.get_field(name))  # a column, not a relation


def _read(rows: QuerySet[Any], part: QuerySet[Any], limit: int) -> list[Any]:
    """The first `limit` rows of `part` in its order: their ids, then those rows of `rows`."""
    ids = list(part.values_list("pk", flat=True)[:limit])
    if not ids:
        return []
    found = {row.pk: row for row in rows.filter(pk__in=ids).order_by()}
    return [found[pk] for pk in ids if pk in found]


def capped_count(rows: QuerySet[Any], limit: int) -> int:
    """How many rows `rows` holds, counting no further than `limit`.

    `SELECT COUNT(*) FROM (SELECT … LIMIT n)`: the database stops reading at `limit`
    rows, where a plain COUNT(*) reads every one (seconds at 10 M log rows on MariaDB).
    """
    return rows.values("pk").order_by()[:limit].count()


class SeekChangeList(ChangeList):
    """The console's change list, taking the cursors of `InfinitePaginator` out of the
    query string (the admin would read them as filters on columns of those names)."""

    def __init__(self, request: Any, *args: Any, **kwargs: Any) -> None:
        query = request.GET.copy()
        # Read by `SeekPaging.get_paginator`, which the list calls with the request.
        request.gptload_seek = {name: query.pop(name)[-1] for name in (AFTER_VAR, BEFORE_VAR)
                                if name in query}  # fmt: skip
        request.GET = query
        super().__init__(request, *args, **kwargs)


class InfinitePaginator(paginator.InfinitePaginator):
    """Pages without a COUNT(*); "next" while a page comes back full.

    A page reached by the console's "next" or "previous" link carries a cursor (the row
    it follows or precedes) and is read by a seek on the list's index when the list is in
    its keyset order (`keyset`): as quick 20,000 pages deep as on page 2. A page asked
    for by number alone (the URL edited by hand, a list sorted by another column) is read
    by offset, in two steps: its row ids first, off the list's index alone (every
    secondary index holds the primary key), then those rows, so the rows skipped are never
    read whole. One step (`LIMIT 50 OFFSET 9950`) fetched all 10,000 rows from the table.

    `uncounted` tells `templates/admin/actions.html` to offer "select every match" instead
    of quoting the paginator's stand-in total. It keeps Unfold's class name: Unfold's
    templates recognise an uncounted list by it (and then leave out "N results").
    """

    uncounted = True

    def __init__(self, object_list: Any, per_page: int, *args: Any, keyset: Keyset | None = None,
                 query: QueryDict | None = None, seek: dict[str, str] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(object_list, per_page, *args, **kwargs)
        self.keyset, self.query, self.seek = keyset, query, seek or {}
        self.next_query = self.previous_query = ""

    def page(self, number: Any) -> Any:
        number = self.validate_number(number)
        listed = self.object_list
        keyset = self.keyset if isinstance(listed, QuerySet) and self.keyset else None
        if keyset is None or not keyset.serves(listed):
            bottom = (number - 1) * self.per_page
            return self._page(self.rows(bottom, bottom + self.per_page), number, keyset)
        try:
            if number == 1:  # ids first here too: the key list joins its groups, and
                # MariaDB sorted a million joined rows for `LIMIT 50` (18 s)
                rows = keyset.after(listed, None, self.per_page)
            elif AFTER_VAR in self.seek:
                rows = keyset.after(listed, self.seek[AFTER_VAR], self.per_page)
            elif BEFORE_VAR in self.seek:
                rows = keyset.before(listed, self.seek[BEFORE_VAR], self.per_page)
            else:
                bottom = (number - 1) * self.per_page
                rows = list(self.rows(bottom, bottom + self.per_page))
        except BadCursor:
            rows = list(self.rows((number - 1) * self.per_page, number * self.per_page))
        return self._page(rows, number, keyset)

    def _page(self, rows: Any, number: int, keyset: Keyset | None) -> Any:
        shown = list(rows)
        page = self._get_page(shown, number, self)
        query = self.query
        if keyset is not None and keyset.serves(self.object_list) and query is not None and shown:
            self.next_query = self._link(query, number + 1, AFTER_VAR, keyset.cursor(shown[-1]))
            self.previous_query = self._link(query, number - 1, BEFORE_VAR,
                                             keyset.cursor(shown[0]))  # fmt: skip
        return page

    def _link(self, query: QueryDict, number: int, name: str, cursor: str) -> str:
        params = {k: v for k, v in query.lists() if k not in (AFTER_VAR, BEFORE_VAR, PAGE_VAR)}
        if number > 1:
            params |= {PAGE_VAR: [str(number)], name: [cursor]}
        return "?" + urlencode(sorted(params.items()), doseq=True)

    def rows(self, bottom: int, top: int) -> Any:
        listed = self.object_list
        if bottom == 0 or not isinstance(listed, QuerySet):
            return listed[bottom:top]
        ids = list(listed.values_list("pk", flat=True)[bottom:top])
        return listed.filter(pk__in=ids) if ids else listed.none()


class SeekPaging:
    """A `ModelAdmin` mixin: an uncounted list whose "next" and "previous" seek on
    `keyset` (see `InfinitePaginator`)."""

    keyset: Keyset | None = None
    paginator = InfinitePaginator
    show_full_result_count = False

    def get_changelist(self, request: Any, **kwargs: Any) -> type[ChangeList]:
        return SeekChangeList

    def get_paginator(self, request: Any, queryset: Any, per_page: int, orphans: int = 0,
                      allow_empty_first_page: bool = True) -> InfinitePaginator:  # fmt: skip
        return InfinitePaginator(queryset, per_page, orphans, allow_empty_first_page,
                                 keyset=self.keyset, query=request.GET,
                                 seek=getattr(request, "gptload_seek", None))  # fmt: skip
