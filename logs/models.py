from __future__ import annotations

import uuid

from django.db import models


class RequestType(models.TextChoices):
    RETRY = "retry", "Retry"
    FINAL = "final", "Final"


class RequestLog(models.Model):
    """One upstream attempt (GPT-Load's `request_logs`), plus token usage.

    Groups and access keys are referenced by plain id, without a foreign key, so that the
    log of a deleted group or access key survives (and the batch writer's prepared INSERT
    takes ids as they come, with nothing to check per row). Indexes serve the newest-first listing, the filters of the
    log API and the retention delete at ten million rows.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    timestamp = models.DateTimeField()
    group_id = models.PositiveBigIntegerField(null=True, blank=True)
    group_name = models.CharField(max_length=255, blank=True)
    parent_group_id = models.PositiveBigIntegerField(null=True, blank=True)
    parent_group_name = models.CharField(max_length=255, blank=True)
    key_value = models.TextField(blank=True, help_text="Encrypted like the key it names.")
    key_hash = models.CharField(max_length=128, blank=True)
    model = models.CharField(max_length=255, blank=True)
    is_success = models.BooleanField(default=False)
    source_ip = models.CharField(max_length=64, blank=True)
    status_code = models.PositiveSmallIntegerField()
    request_path = models.CharField(max_length=500, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    error_message = models.TextField(blank=True)
    user_agent = models.CharField(max_length=512, blank=True)
    request_type = models.CharField(
        max_length=20, choices=RequestType.choices, default=RequestType.FINAL
    )
    upstream_addr = models.CharField(max_length=500, blank=True)
    is_stream = models.BooleanField(default=False)
    request_body = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    total_tokens = models.PositiveIntegerField(null=True, blank=True)
    access_key_id = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The access key the client called with, if any."
    )

    class Meta:
        ordering = ["-timestamp"]
        indexes = [
            models.Index(fields=["timestamp"], name="log_time"),
            models.Index(fields=["group_id", "timestamp"], name="log_group_time"),
            models.Index(fields=["parent_group_id", "timestamp"], name="log_parent_time"),
            models.Index(fields=["key_hash", "timestamp"], name="log_key_time"),
            models.Index(fields=["model", "timestamp"], name="log_model_time"),
            models.Index(fields=["status_code", "timestamp"], name="log_status_time"),
            models.Index(fields=["request_type", "timestamp"], name="log_type_time"),
            models.Index(fields=["is_success", "timestamp"], name="log_success_time"),
            models.Index(fields=["access_key_id", "timestamp"], name="log_access_time"),
        ]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.group_name} {self.status_code}"


class HourlyStat(models.Model):
    """Requests, failures and tokens per group × model × hour (UTC-aligned), for charts.

    Final attempts only; a request through an aggregate counts for the member and for the
    aggregate. The dashboard reads these, never the log table.
    """

    time = models.DateTimeField(help_text="Start of the hour (UTC).")
    group_id = models.PositiveBigIntegerField()
    model = models.CharField(max_length=255, blank=True)
    success_count = models.PositiveBigIntegerField(default=0)
    failure_count = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-time"]
        verbose_name = "hourly statistic"
        constraints = [
            models.UniqueConstraint(
                fields=["time", "group_id", "model"], name="uniq_hour_group_model"
            ),
        ]
        indexes = [models.Index(fields=["group_id", "time"], name="hourly_group_time")]

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:00} group {self.group_id} {self.model}"

    @property
    def request_count(self) -> int:
        return self.success_count + self.failure_count


class AccessKeyHourlyStat(models.Model):
    """Requests, failures and tokens per access key × group × model × hour (UTC-aligned):
    what each client used, for its usage page and for billing.

    Final attempts of calls made with an access key only. The group is the one the client
    named in its URL (an aggregate, when it called one), so that a key's rows add up to
    its calls without counting a call twice. Kept as long as `HourlyStat`.
    """

    hour = models.DateTimeField(help_text="Start of the hour (UTC).")
    access_key_id = models.PositiveBigIntegerField()
    group_id = models.PositiveBigIntegerField()
    model = models.CharField(max_length=255, blank=True)
    requests = models.PositiveBigIntegerField(default=0)
    failures = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-hour"]
        verbose_name = "access key hourly statistic"
        constraints = [
            # Access key first: the same index serves a key's usage over a day or a month.
            models.UniqueConstraint(
                fields=["access_key_id", "hour", "group_id", "model"], name="uniq_access_hour"
            ),
        ]
        indexes = [models.Index(fields=["hour"], name="access_hour")]  # retention

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} access key {self.access_key_id} {self.model}"
