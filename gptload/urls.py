from __future__ import annotations

from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from gptload.health import health
from proxy.api import api as proxy_api

admin.site.site_header = "gptload"
admin.site.site_title = "gptload"
admin.site.index_title = "Gateway administration"

urlpatterns = [
    path("health", health, name="health"),
    path("admin/", admin.site.urls),
    path("proxy/", proxy_api.urls),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
