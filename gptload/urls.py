from __future__ import annotations

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path, re_path
from django.views.generic import RedirectView

from access import api as access_api
from gptload import api_system
from gptload.health import health, ready
from gptload.lib.api import api, unknown_path
from gptload.metrics import scrape
from keys import api_groups, api_keys
from logs import api as logs_api
from logs import api_usage
from proxy.api import api as proxy_api
from settings_app import api as settings_api

admin.site.site_header = "gptload"
admin.site.site_title = "gptload"
admin.site.index_title = "Dashboard"

api.add_router("", api_system.router)  # auth, channel types, integration, tasks
api.add_router("/groups", api_groups.router)
api.add_router("/keys", api_keys.router)
api.add_router("/tasks", api_keys.tasks_router)
api.add_router("", logs_api.router)  # logs and dashboard
api.add_router("/settings", settings_api.router)
api.add_router("/access-keys", access_api.router)
api.add_router("/access-keys", api_usage.router)  # usage: read from the logs' rollups

urlpatterns = [
    path("health", health, name="health"),
    path("health/ready", ready, name="ready"),
    path("metrics", scrape, name="metrics"),
    path("admin/", admin.site.urls),
    path("i18n/", include("django.conf.urls.i18n")),  # the console's language switcher
    path("proxy/", proxy_api.urls),
    path("api/", api.urls),
    re_path(r"^api/", unknown_path),  # any rest, newlines included (`.` stops at one)
    # Browsers ask every page's host for it; answered here, not logged as a 404.
    path("favicon.ico", RedirectView.as_view(url=static("gptload/favicon.ico"), permanent=True)),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
