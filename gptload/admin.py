"""Admin registrations of the entry package: the third-party models in the console's look."""

from __future__ import annotations

from typing import Any


def restyle_third_party_admins() -> None:
    """Django's users and roles and Celery beat's schedules, in the console's look: each
    one's own admin class, with Unfold's `ModelAdmin` mixed in."""
    from django.contrib import admin
    from django.contrib.auth.models import Group, User
    from django_celery_beat.models import (
        ClockedSchedule,
        CrontabSchedule,
        IntervalSchedule,
        PeriodicTask,
        SolarSchedule,
    )
    from unfold.admin import ModelAdmin
    from unfold.forms import AdminPasswordChangeForm, UserChangeForm, UserCreationForm

    for model in (User, Group, PeriodicTask, IntervalSchedule, CrontabSchedule, SolarSchedule,
                  ClockedSchedule):  # fmt: skip
        own = type(admin.site._registry[model])
        extra: dict[str, Any] = {}
        if model is User:
            extra = {"form": UserChangeForm, "add_form": UserCreationForm,
                     "change_password_form": AdminPasswordChangeForm}  # fmt: skip
        admin.site.unregister(model)
        admin.site.register(model, type(own.__name__, (own, ModelAdmin), extra))


restyle_third_party_admins()
