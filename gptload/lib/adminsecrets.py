"""Admin form fields that edit a secret without ever rendering it back to the page."""

from __future__ import annotations

from typing import Any

from django import forms

KEEP_HELP = "Hidden. Type new values to replace them; leave empty to keep the current ones."


class SecretFieldsForm(forms.ModelForm):
    """A ModelForm whose `secret_fields` render empty and keep the stored value when left blank."""

    secret_fields: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in self.active_secret_fields():
            field = self.fields[name]
            field.widget = forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"})
            field.required = False
            field.help_text = KEEP_HELP if self.instance.pk else field.help_text

    def active_secret_fields(self) -> tuple[str, ...]:
        return tuple(name for name in self.secret_fields if name in self.fields)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for name in self.active_secret_fields():
            if self.instance.pk and not cleaned.get(name):
                cleaned[name] = getattr(self.instance, name)
        return cleaned
