"""Console lists too long to count on every page view (keys, request logs)."""

from __future__ import annotations

from unfold import paginator


class InfinitePaginator(paginator.InfinitePaginator):
    """Pages by offset without a COUNT(*): "next" while a page comes back full.

    `uncounted` tells `templates/admin/actions.html` to offer "select every match" instead of
    quoting the paginator's stand-in total. It keeps Unfold's class name: Unfold's templates
    recognise an uncounted list by it (and then leave out "N results").
    """

    uncounted = True
