"""`/api/access-keys/{id}/usage`: what an access key used today and this month, next to its
limits. Here rather than in `access.api` because it reads the request log's rollups,
which `access` (a floor below `logs`) may not import."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Field, Router, Schema

from access.api import get_access_key
from gptload.lib.api import Envelope, ok
from logs import usage

router = Router(tags=["access keys"])


class FiguresOut(Schema):
    requests: int = Field(description="Final attempts (one per call), failed ones included.")
    failures: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PeriodOut(FiguresOut):
    since: datetime = Field(description="Start of the day or month in the server's TZ.")


class LimitsOut(Schema):
    rpm: int
    tpm: int
    daily_tokens: int
    monthly_tokens: int
    max_concurrency: int


class RemainingOut(Schema):
    daily_tokens: int | None = Field(description="null: no daily limit.")
    monthly_tokens: int | None = Field(description="null: no monthly limit.")


class BreakdownOut(FiguresOut):
    group_id: int = Field(description="The group the client named (an aggregate's own id).")
    group_name: str = Field(description="Empty when the group has been deleted since.")
    model: str


class UsageOut(Schema):
    id: int
    name: str
    time_zone: str
    today: PeriodOut
    this_month: PeriodOut
    limits: LimitsOut = Field(description="0: no limit.")
    remaining: RemainingOut
    by_group_model: list[BreakdownOut] = Field(description="This month, most tokens first.")


@router.get("/{access_key_id}/usage", response=Envelope[UsageOut])
def access_key_usage(request: HttpRequest, access_key_id: int) -> dict[str, Any]:
    """Requests, failures and tokens of an access key today and this month (days and
    months of the server's TZ), its limits and what is left of its token budgets, and
    this month per group and model; from the hourly rollups of final attempts."""
    return ok(usage.usage(get_access_key(access_key_id)))
