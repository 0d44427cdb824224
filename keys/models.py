from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F
from django.utils import timezone

from gptload.lib.crypto import DecryptionError, current_cipher
from gptload.lib.secrets import mask
from keys import validation
from settings_app import registry


class ChannelType(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    OPENAI_RESPONSE = "openai-response", "OpenAI Responses"
    GEMINI = "gemini", "Gemini"
    ANTHROPIC = "anthropic", "Anthropic"


class GroupType(models.TextChoices):
    STANDARD = "standard", "Standard"
    AGGREGATE = "aggregate", "Aggregate"


AGGREGATE_TEST_MODEL = "-"


class Group(models.Model):
    """A provider format, its weighted upstream URLs, a pool of keys and its settings."""

    name = models.CharField(
        max_length=255, unique=True, validators=[validation.validate_group_name]
    )
    display_name = models.CharField(max_length=255, blank=True)
    description = models.CharField(max_length=512, blank=True)
    group_type = models.CharField(
        max_length=50, choices=GroupType.choices, default=GroupType.STANDARD
    )
    channel_type = models.CharField(max_length=50, choices=ChannelType.choices)
    upstreams = models.JSONField(
        default=list, blank=True, validators=[validation.validate_upstreams]
    )
    validation_endpoint = models.CharField(
        max_length=255, blank=True, validators=[validation.validate_validation_endpoint]
    )
    test_model = models.CharField(max_length=255, blank=True)
    param_overrides = models.JSONField(
        default=dict, blank=True, validators=[validation.validate_param_overrides]
    )
    config = models.JSONField(default=dict, blank=True, help_text="Per-group setting overrides.")
    header_rules = models.JSONField(
        default=list, blank=True, validators=[validation.validate_header_rules]
    )
    model_redirect_rules = models.JSONField(
        default=dict, blank=True, validators=[validation.validate_model_redirect_rules]
    )
    model_redirect_strict = models.BooleanField(
        default=False, help_text="Refuse models that have no redirect rule (whitelist mode)."
    )
    proxy_keys = models.TextField(blank=True, help_text="Comma-separated keys for this group only.")
    enabled = models.BooleanField(default=True)
    sort = models.IntegerField(default=0)
    last_validated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["sort", "-id"]

    def __str__(self) -> str:
        return self.display_name or self.name

    @property
    def is_aggregate(self) -> bool:
        return self.group_type == GroupType.AGGREGATE

    @property
    def proxy_key_list(self) -> list[str]:
        return [k for k in self.proxy_keys.split(",") if k]

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        self.proxy_keys = ",".join(
            dict.fromkeys(k.strip() for k in self.proxy_keys.split(",") if k.strip())
        )
        try:
            self.config = registry.validate_group_config(self.config or {})
        except registry.SettingError as exc:
            errors.setdefault("config", []).append(str(exc))
        if self.is_aggregate:
            self._clean_aggregate(errors)
        else:
            self._clean_standard(errors)
        if self.pk and self._channel_is_locked():
            errors.setdefault("channel_type", []).append(
                "This group belongs to an aggregate group: remove it there before changing "
                "its channel type or validation endpoint."
            )
        if errors:
            raise ValidationError(errors)

    def _clean_standard(self, errors: dict[str, list[str]]) -> None:
        if not self.test_model.strip() or self.test_model == AGGREGATE_TEST_MODEL:
            errors.setdefault("test_model", []).append("Name the model used to validate keys.")
        if not self.upstreams:
            errors.setdefault("upstreams", []).append("Add at least one upstream URL.")

    def _clean_aggregate(self, errors: dict[str, list[str]]) -> None:
        self.test_model = AGGREGATE_TEST_MODEL
        if self.upstreams:
            errors.setdefault("upstreams", []).append(
                "An aggregate group routes to its member groups and has no upstreams of its own."
            )
        if self.model_redirect_rules:
            errors.setdefault("model_redirect_rules", []).append(
                "Model redirects belong on the member groups, not on an aggregate group."
            )
        if self.pk and self.members.exclude(sub_group__channel_type=self.channel_type).exists():
            errors.setdefault("channel_type", []).append(
                "Every member group must have the aggregate's channel type."
            )

    def _channel_is_locked(self) -> bool:
        stored = (
            Group.objects.filter(pk=self.pk).values("channel_type", "validation_endpoint").first()
        )
        if stored is None or not self.memberships.exists():
            return False
        return (stored["channel_type"], stored["validation_endpoint"]) != (
            self.channel_type,
            self.validation_endpoint,
        )


class GroupSubGroup(models.Model):
    """A standard group's membership of an aggregate group, with its routing weight."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="members")
    sub_group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="memberships")
    weight = models.PositiveSmallIntegerField(
        default=0, help_text="0-1000; 0 keeps the member but routes nothing to it."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["group", "sub_group"], name="uniq_group_sub_group"),
        ]
        verbose_name = "aggregate member"

    def __str__(self) -> str:
        return f"{self.group.name} → {self.sub_group.name} ({self.weight})"

    def clean(self) -> None:
        if self.weight > 1000:
            raise ValidationError({"weight": "Use a weight between 0 and 1000."})
        if not self.group_id or not self.sub_group_id:
            return
        if self.group_id == self.sub_group_id:
            raise ValidationError({"sub_group": "A group cannot be a member of itself."})
        if not self.group.is_aggregate:
            raise ValidationError({"group": "Members can only be added to an aggregate group."})
        if self.sub_group.is_aggregate:
            raise ValidationError({"sub_group": "Only standard groups can be members."})
        if self.sub_group.channel_type != self.group.channel_type:
            raise ValidationError(
                {
                    "sub_group": f"Member must be a {self.group.channel_type} group like the aggregate."
                }
            )
        first = self.group.members.exclude(pk=self.pk).select_related("sub_group").first()
        if first and first.sub_group.validation_endpoint != self.sub_group.validation_endpoint:
            raise ValidationError({"sub_group": "Members must share one validation endpoint."})


class KeyStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    COOLING = "cooling", "Cooling"
    INVALID = "invalid", "Invalid"
    DISABLED = "disabled", "Disabled"


class APIKeyQuerySet(models.QuerySet["APIKey"]):
    def active_for(self, group: Group | int) -> APIKeyQuerySet:
        return self.filter(group=group, status=KeyStatus.ACTIVE)

    def with_secret(self, group: Group | int, secret: str) -> APIKeyQuerySet:
        return self.filter(group=group, key_hash=current_cipher().hash(secret))

    def count_use(self, counts: Mapping[int, tuple[int, int, float]]) -> None:
        """Adds `(successes, failures, last used at)` to each key's counters, by key id
        (the request log's batch writer calls it inside its transaction)."""
        for key_id, (successes, failures, last) in counts.items():
            self.filter(pk=key_id).update(
                request_count=F("request_count") + successes,
                failure_count=F("failure_count") + failures,
                last_used_at=datetime.fromtimestamp(last, UTC),
            )


class APIKey(models.Model):
    """An upstream secret in a group's pool; stored encrypted when ENCRYPTION_KEY is set."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="api_keys")
    key_value = models.TextField(help_text="The secret (AES-256-GCM ciphertext when encrypted).")
    key_hash = models.CharField(max_length=128)
    status = models.CharField(max_length=16, choices=KeyStatus.choices, default=KeyStatus.ACTIVE)
    cooling_until = models.DateTimeField(null=True, blank=True)
    status_changed_at = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    failure_count = models.PositiveBigIntegerField(default=0, help_text="Failures in all.")
    request_count = models.PositiveBigIntegerField(default=0, help_text="Successful requests.")
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    notes = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = APIKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        constraints = [
            # Dedupe is per group (the same secret may serve several groups), enforced by
            # the database so that bulk imports can insert with ignore_conflicts.
            models.UniqueConstraint(fields=["group", "key_hash"], name="uniq_group_key_hash"),
        ]
        indexes = [
            models.Index(fields=["group", "status"], name="apikey_group_status"),
            models.Index(fields=["group", "-last_used_at", "-id"], name="apikey_group_last_used"),
            # The console's key list of every group, in the same order (a seek, not a sort
            # of a million rows).
            models.Index(fields=["-last_used_at", "-id"], name="apikey_last_used"),
            models.Index(fields=["status", "cooling_until"], name="apikey_status_cooling"),
            models.Index(fields=["key_hash"], name="apikey_hash"),
            # The dashboard's busiest and most failing keys: five rows read off an index
            # rather than 100,000s sorted on every refresh.
            models.Index(fields=["request_count"], name="apikey_requests"),
            models.Index(fields=["failure_count"], name="apikey_failures"),
        ]

    def __str__(self) -> str:
        return self.masked

    @classmethod
    def build(cls, group: Group, secret: str, **fields: Any) -> APIKey:
        key = cls(group=group, **fields)
        key.set_secret(secret)
        return key

    def set_secret(self, secret: str) -> None:
        cipher = current_cipher()
        self.key_value = cipher.encrypt(secret)
        self.key_hash = cipher.hash(secret)

    @property
    def secret(self) -> str:
        """The plaintext secret; raises `DecryptionError` under a different ENCRYPTION_KEY."""
        return current_cipher().decrypt(self.key_value)

    @property
    def masked(self) -> str:
        try:
            return mask(self.secret)
        except DecryptionError:
            return "(cannot decrypt)"

    def set_status(self, status: KeyStatus, *, until: Any = None, error: str = "") -> None:
        self.status = status
        self.cooling_until = until if status == KeyStatus.COOLING else None
        self.status_changed_at = timezone.now()
        if error:
            self.last_error = error


class JobKind(models.TextChoices):
    IMPORT = "import", "Import keys"
    DELETE = "delete", "Delete keys"
    VALIDATE = "validate", "Validate keys"


class JobStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class KeyJob(models.Model):
    """A bulk key operation (import, delete, validate) run by a Celery worker or a command.

    Its row is the job's whole state, so progress survives a web restart and every node
    sees it. See `keys.jobs` for starting, running and reporting jobs.
    """

    kind = models.CharField(max_length=16, choices=JobKind.choices)
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="jobs")
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING)
    # The group's id while the job is unfinished, NULL once it finished. Its unique index
    # lets one job per group run at a time on every database: MySQL and MariaDB ignore
    # conditional unique constraints (`… WHERE finished_at IS NULL`), NULLs never clash.
    running_group_id = models.PositiveBigIntegerField(null=True, unique=True, editable=False)
    processed = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(default=0)
    params = models.JSONField(default=dict, blank=True, help_text="e.g. the statuses to validate.")
    payload = models.TextField(
        blank=True, help_text="The key list (encrypted like keys); emptied when the job ends."
    )
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, help_text="Moves with progress.")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "key job"

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk} ({self.status})"

    @property
    def is_running(self) -> bool:
        return self.finished_at is None


class KeyJobPart(models.Model):
    """A slice of an import job's key list, stored while the upload is read and read back
    by the worker one slice at a time, so that neither process ever holds the whole list
    (a 16 MiB file is 400,000 keys). In the database, not a file: a cluster's worker may
    run on another machine than the web node that took the upload. Deleted when the job
    ends."""

    job = models.ForeignKey(KeyJob, on_delete=models.CASCADE, related_name="parts")
    number = models.PositiveIntegerField()
    keys = models.TextField(help_text="Keys, one a line, encrypted like keys.")

    class Meta:
        verbose_name = "key job part"
        constraints = [
            models.UniqueConstraint(fields=["job", "number"], name="uniq_keyjob_part"),
        ]

    def __str__(self) -> str:
        return f"part {self.number} of job {self.job_id}"
