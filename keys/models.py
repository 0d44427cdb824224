from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import Count, F
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


# A key's place in the tally (`KeyTally`): its group and its state. Writes that change
# either go through the counted paths of `APIKeyQuerySet` and `APIKey`.
TALLIED = frozenset({"status", "group", "group_id"})
LOCK_BATCH = 1000  # ids per IN list (MySQL's and SQLite's placeholder limits)
Place = tuple[int, str]  # (group id, status)


class APIKeyQuerySet(models.QuerySet["APIKey"]):
    """Keys; every write that adds, removes or moves keys keeps `KeyTally` true in its
    own transaction. The rows it touches are locked and read (group and state) before
    they are written, and only those rows are written, so that concurrent writers never
    count one change twice nor miss one."""

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

    # -- counted writes --

    def places(self) -> dict[int, Place]:
        """Each key's (group, state), its row locked until the transaction ends.

        The rows are locked by primary key, in ascending order, never through another
        index: then two writers never wait on each other in a circle (locking reads
        through the (group, status) index deadlocked with updates by id). Rows that no
        longer match once locked are left out.
        """
        ids = list(self.order_by("pk").values_list("pk", flat=True))
        places: dict[int, Place] = {}
        for start in range(0, len(ids), LOCK_BATCH):
            chunk = ids[start : start + LOCK_BATCH]
            locked = self.uncounted(chunk).order_by("pk").select_for_update()
            rows = {pk: (group_id, status) for pk, group_id, status
                    in locked.values_list("pk", "group_id", "status")}  # fmt: skip
            for pk in self.filter(pk__in=chunk).values_list("pk", flat=True):
                if pk in rows:
                    places[pk] = rows[pk]
        return places

    def update(self, **fields: Any) -> int:
        if TALLIED.isdisjoint(fields):
            return super().update(**fields)
        group_id = fields.get("group_id", fields.get("group"))
        group_id = getattr(group_id, "pk", group_id)
        with transaction.atomic(using=self.db):
            places = self.places()
            moves: Counter[Place] = Counter()
            for old_group, old_status in places.values():
                moves[(old_group, old_status)] -= 1
                moves[(group_id or old_group, fields.get("status", old_status))] += 1
            changed = sum(self.uncounted(ids).update(**fields) for ids in _batches(places))
            KeyTally.objects.add(moves)
        return changed

    def delete(self) -> tuple[int, dict[str, int]]:
        with transaction.atomic(using=self.db):
            places = self.places()
            deleted, by_model = 0, Counter[str]()
            for ids in _batches(places):
                count, counts = self.uncounted(ids).delete()
                deleted += count
                by_model.update(counts)
            KeyTally.objects.add(leaving(places))
        return deleted, dict(by_model)

    def remove(self) -> int:
        """Deletes the keys with one plain DELETE per 1000 rows, counted: no key is loaded
        and no per-row signal is sent (`delete()` sends `post_delete` for each key)."""
        with transaction.atomic(using=self.db):
            places = self.places()
            deleted = sum(self.uncounted(ids)._raw_delete(self.db) for ids in _batches(places))
            KeyTally.objects.add(leaving(places))
        return deleted

    def bulk_create(self, objs: Iterable[APIKey], *args: Any, **kwargs: Any) -> list[APIKey]:
        keys = list(objs)
        with transaction.atomic(using=self.db):
            created = super().bulk_create(keys, *args, **kwargs)
            if kwargs.get("ignore_conflicts") or kwargs.get("update_conflicts"):
                KeyTally.objects.recount({key.group_id for key in keys})  # which went in is unknown
            else:
                KeyTally.objects.add(Counter((key.group_id, key.status) for key in keys))
        return created

    def bulk_update(
        self, objs: Iterable[APIKey], fields: Iterable[str], batch_size: int | None = None
    ) -> int:
        fields = list(fields)
        keys = list(objs)
        with transaction.atomic(using=self.db):
            changed = super().bulk_update(keys, fields, batch_size=batch_size)
            if not TALLIED.isdisjoint(fields):
                KeyTally.objects.recount({key.group_id for key in keys})
        return changed

    def uncounted(self, ids: Sequence[int]) -> models.QuerySet[APIKey]:
        """The rows by id alone, through the plain QuerySet: its writes do not move the
        tally, so the caller, having locked the rows (`places()`), moves it."""
        rows: models.QuerySet[APIKey] = models.QuerySet(self.model, using=self.db)
        return rows.filter(pk__in=ids)


def leaving(places: Mapping[int, Place]) -> Counter[Place]:
    """The tally's moves when the keys of `places` go."""
    return Counter({place: -n for place, n in Counter(places.values()).items()})


def _batches(places: Mapping[int, Place]) -> Iterable[list[int]]:
    ids = list(places)
    for start in range(0, len(ids), LOCK_BATCH):
        yield ids[start : start + LOCK_BATCH]


class KeyTallyQuerySet(models.QuerySet["KeyTally"]):
    def add(self, moves: Mapping[Place, int]) -> None:
        """Moves the counts by `moves` ((group id, state) → change) in one fixed order,
        so that two writers never wait on each other's rows."""
        for (group_id, status), change in sorted(moves.items()):
            if not change:
                continue
            rows = self.filter(group_id=group_id, status=status)
            if not rows.update(count=F("count") + change):
                # The group's first key in this state: its row is made (once, whoever
                # comes first), then moved.
                self.bulk_create(
                    [KeyTally(group_id=group_id, status=status)], ignore_conflicts=True
                )
                rows.update(count=F("count") + change)

    def recount(self, group_ids: Iterable[int]) -> None:
        """Counts each group's keys afresh (one index range), its tally rows locked
        meanwhile so that no write lands between the count and the tally."""
        for group_id in sorted(set(group_ids)):
            with transaction.atomic(using=self.db):
                held = {
                    row.status: row for row in self.select_for_update().filter(group_id=group_id)
                }
                counts = dict(
                    APIKey.objects.filter(group_id=group_id).order_by().values_list("status")
                    .annotate(n=Count("pk"))
                )  # fmt: skip
                for status in KeyStatus.values:
                    row = held.get(status)
                    if row is None:
                        if counts.get(status) and Group.objects.filter(pk=group_id).exists():
                            self.create(group_id=group_id, status=status, count=counts[status])
                    elif row.count != counts.get(status, 0):
                        self.filter(pk=row.pk).update(count=counts.get(status, 0))

    def by_group(self, group_ids: Iterable[int] | None = None) -> dict[int, dict[str, int]]:
        """Keys per state for each group (all groups when `group_ids` is None)."""
        rows = self.all() if group_ids is None else self.filter(group_id__in=list(group_ids))
        counts: dict[int, dict[str, int]] = {}
        for group_id, status, count in rows.values_list("group_id", "status", "count"):
            counts.setdefault(group_id, {})[status] = count
        return counts


class KeyTally(models.Model):
    """How many keys a group holds in a state, kept true by every write that adds,
    removes or moves keys (`APIKeyQuerySet`), so that the dashboard, the group list and
    the group stats read a few rows instead of counting a million keys. A daily job
    (`keys.tasks.recount_keys`) counts afresh as a safety net."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="tallies")
    status = models.CharField(max_length=16, choices=KeyStatus.choices)
    count = models.BigIntegerField(default=0)

    objects = KeyTallyQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["group", "status"], name="uniq_tally_group_status"),
        ]

    def __str__(self) -> str:
        return f"{self.group_id}/{self.status}: {self.count}"


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

    def save(self, *args: Any, **kwargs: Any) -> None:
        fields = kwargs.get("update_fields")
        if fields is not None and TALLIED.isdisjoint(fields):
            super().save(*args, **kwargs)
            return
        with transaction.atomic(using=kwargs.get("using")):
            old = APIKey.objects.filter(pk=self.pk).places().get(self.pk) if self.pk else None
            super().save(*args, **kwargs)
            moves = Counter({(self.group_id, self.status): 1})
            if old:
                moves[old] -= 1
            KeyTally.objects.add(moves)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        with transaction.atomic(using=kwargs.get("using")):
            old = APIKey.objects.filter(pk=self.pk).places().get(self.pk)
            result = super().delete(*args, **kwargs)
            if old:
                KeyTally.objects.add({old: -1})
        return result

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
