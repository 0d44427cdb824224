"""gptload settings.

Static configuration comes from the environment (and a `.env` file in the working
directory), with GPT-Load's variable names and defaults. Each variable is read once, here,
through the typed helpers of `gptload.lib.env`, which stop startup with one line naming
the variable when a value makes no sense. Hot-reloadable settings (retries, timeouts, …)
live in the database: see `settings_app.registry`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from django.utils.translation import gettext_lazy as _
from dotenv import load_dotenv

from gptload.lib import dsn, lifeline
from gptload.lib.env import ConfigError, Env
from gptload.lib.logconfig import LEVELS, build_logging
from gptload.lib.secrets import stored_secret

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(Path.cwd() / ".env", override=False)
env = Env()

# --- server (GPT-Load names and defaults) ---
PORT = env.integer("PORT", 3001, minimum=1, maximum=65535)
HOST = env.string("HOST", "0.0.0.0")
SERVER_READ_TIMEOUT = env.integer("SERVER_READ_TIMEOUT", 60, minimum=1)
SERVER_WRITE_TIMEOUT = env.integer("SERVER_WRITE_TIMEOUT", 600, minimum=1)
SERVER_IDLE_TIMEOUT = env.integer("SERVER_IDLE_TIMEOUT", 120, minimum=1)
# GPT-Load bumps anything below 10 s to 10 s; we refuse it instead of silently changing it.
SERVER_GRACEFUL_SHUTDOWN_TIMEOUT = env.integer("SERVER_GRACEFUL_SHUTDOWN_TIMEOUT", 10, minimum=10)
WEB_CONCURRENCY = env.integer("WEB_CONCURRENCY", 1, minimum=1, maximum=64)
IS_SLAVE = env.boolean("IS_SLAVE", False)
MAX_CONCURRENT_REQUESTS = env.integer("MAX_CONCURRENT_REQUESTS", 100, minimum=1)
# The largest request body /proxy/ accepts, in MiB (413 in the provider's shape above it):
# room for several large images in one vision request.
MAX_REQUEST_BODY_MB = env.integer("MAX_REQUEST_BODY_MB", 64, minimum=1, maximum=4096)
MAX_REQUEST_BODY = MAX_REQUEST_BODY_MB * 1024 * 1024
# Addresses whose X-Forwarded-For / X-Forwarded-Proto are believed (a reverse proxy in
# front): comma-separated IPs or networks, or * (any: only when nothing else can reach the
# port). Anyone else's are ignored, so a client cannot forge the address that is logged
# and rate limited.
FORWARDED_ALLOW_IPS = env.string("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# The address clients reach gptload at (behind a reverse proxy, say), for the endpoints
# that commands and the admin print; else http://HOST:PORT.
PUBLIC_URL = env.string("PUBLIC_URL", "").rstrip("/")
if PUBLIC_URL and not PUBLIC_URL.startswith(("http://", "https://")):
    raise ConfigError("PUBLIC_URL", f"expected an http:// or https:// URL, got {PUBLIC_URL!r}")

# A child of another gptload process (a uvicorn worker, the embedded Celery worker, a
# test's server) dies with it: see gptload.lib.lifeline.
lifeline.hold(env.integer("GPTLOAD_PARENT_PID", 0, minimum=0))

# --- stores ---
DATABASE_DSN = env.string("DATABASE_DSN", "")
DATABASES = {"default": dsn.parse_database(DATABASE_DSN, BASE_DIR)}
_SQLITE = DATABASES["default"]["ENGINE"].endswith("sqlite3")
if _SQLITE:
    dsn.ensure_sqlite_directory(DATABASES["default"]["NAME"])
REDIS_DSN = dsn.parse_redis(env.string("REDIS_DSN", ""))
# Pub/sub channels are server-wide, not per database: installations sharing one Redis
# server on different database numbers must not hear each other's announcements.
REDIS_CHANNEL_PREFIX = f"gptload:{dsn.redis_database(REDIS_DSN)}:"
DATA_DIR = BASE_DIR / "data"
# What this installation keeps on disk besides the database (the generated AUTH_KEY, the
# embedded broker's queue): beside the SQLite file, else in data/.
STATE_DIR = Path(DATABASES["default"]["NAME"]).parent if _SQLITE else DATA_DIR
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- secrets ---
# Unset (or empty): a strong key made at first boot and kept in STATE_DIR/auth_key
# (0600), never a published default. `serve` prints it at the first start after it was
# made, and `manage.py auth_key` prints it on demand.
AUTH_KEY = env.string("AUTH_KEY")
AUTH_KEY_FILE: Path | None = None
if not AUTH_KEY:
    AUTH_KEY_FILE = STATE_DIR / "auth_key"
    AUTH_KEY, _generated = stored_secret(AUTH_KEY_FILE, "sk-")
ENCRYPTION_KEY = env.string("ENCRYPTION_KEY", "")
# Django's own signing key (sessions, CSRF, password resets): a secret of its own, never
# derived from AUTH_KEY (a weak AUTH_KEY must not make sessions forgeable). Unset: made at
# first boot and kept in STATE_DIR/secret_key (0600). A cluster sets the same one on
# every node, or a session signed by one node is refused by the others.
SECRET_KEY = env.string("SECRET_KEY") or stored_secret(STATE_DIR / "secret_key")[0]

if REDIS_DSN:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_DSN,
            "KEY_PREFIX": "gptload",
            "OPTIONS": {
                "SOCKET_CONNECT_TIMEOUT": 2,
                "SOCKET_TIMEOUT": 2,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- CORS (applied by django-cors-headers) ---
ENABLE_CORS = env.boolean("ENABLE_CORS", False)
ALLOWED_ORIGINS = env.items("ALLOWED_ORIGINS", "")
ALLOWED_METHODS = [m.upper() for m in env.items("ALLOWED_METHODS", "GET,POST,PUT,DELETE,OPTIONS")]
ALLOWED_HEADERS = env.items("ALLOWED_HEADERS", "*")
ALLOW_CREDENTIALS = env.boolean("ALLOW_CREDENTIALS", False)
if ENABLE_CORS and not ALLOWED_ORIGINS:
    raise ConfigError(
        "ALLOWED_ORIGINS", "ENABLE_CORS is on but no origin is allowed (use * or a list)"
    )
if ENABLE_CORS and ALLOW_CREDENTIALS and "*" in ALLOWED_ORIGINS:
    # Every site's scripts could then call with the visitor's cookies: the browser would
    # refuse `*` with credentials, and the only way round is echoing any origin.
    raise ConfigError(
        "ALLOW_CREDENTIALS", "cannot be combined with ALLOWED_ORIGINS=*: list the origins "
        "allowed to send credentials, or turn ALLOW_CREDENTIALS off"
    )  # fmt: skip
CORS_ALLOW_ALL_ORIGINS = "*" in ALLOWED_ORIGINS
CORS_ALLOWED_ORIGINS = [o for o in ALLOWED_ORIGINS if o != "*"]
CORS_ALLOW_METHODS = ALLOWED_METHODS
CORS_ALLOW_HEADERS = ALLOWED_HEADERS
CORS_ALLOW_CREDENTIALS = ALLOW_CREDENTIALS

# --- logging ---
LOG_LEVEL = env.choice("LOG_LEVEL", "info", tuple(LEVELS))
LOG_FORMAT = env.choice("LOG_FORMAT", "text", ("text", "json"))
LOG_ENABLE_FILE = env.boolean("LOG_ENABLE_FILE", False)
LOG_FILE_PATH = Path(env.string("LOG_FILE_PATH", "data/logs/app.log"))
if not LOG_FILE_PATH.is_absolute():
    LOG_FILE_PATH = BASE_DIR / LOG_FILE_PATH
if LOG_ENABLE_FILE:
    try:
        LOG_FILE_PATH.parent.mkdir(parents=True, exist_ok=True)
        LOG_FILE_PATH.touch()
    except OSError as exc:
        raise ConfigError(
            "LOG_FILE_PATH", f"cannot write {LOG_FILE_PATH}: {exc.strerror}"
        ) from None
LOGGING = build_logging(LOG_LEVEL, LOG_FORMAT, LOG_FILE_PATH if LOG_ENABLE_FILE else None)

# --- metrics (/metrics) ---
# Where prometheus_client keeps each web worker's values so that any worker's answer sums
# them all (read by prometheus_client itself, mirrored here). `serve` sets it to a fresh
# directory under STATE_DIR/metrics when it starts more than one worker; set it yourself
# (an empty directory, emptied before each start) to run several workers without `serve`.
PROMETHEUS_MULTIPROC_DIR = env.string("PROMETHEUS_MULTIPROC_DIR", "")

# --- time ---
TIME_ZONE = env.timezone("TZ", "UTC")
USE_TZ = True
USE_I18N = True
LANGUAGE_CODE = "en"
# The console and the API's messages follow the browser's language (GPT-Load's three).
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文"), ("ja", "日本語")]
LOCALE_PATHS = [BASE_DIR / "locale"]

# --- Django ---
DEBUG = env.boolean("DJANGO_DEBUG", False)
ALLOWED_HOSTS = ["*"]  # a gateway answers whatever name it is reached by
CSRF_TRUSTED_ORIGINS = env.items("CSRF_TRUSTED_ORIGINS", "")
# daphne's app provides `runserver` on ASGI (it must precede staticfiles). Loading it
# installs Twisted's reactor and costs every uvicorn worker ~20 MiB, so only runserver
# gets it; `daphne gptload.asgi:application` serves without it.
RUNSERVER = sys.argv[1:2] == ["runserver"]
INSTALLED_APPS = [
    *(["daphne"] if RUNSERVER else []),
    # The admin's theme, before the admin, whose templates it overrides (its basic config:
    # the default one would replace our admin site with its own).
    "unfold.apps.BasicAppConfig",
    "unfold.contrib.filters",
    "gptload.apps.AdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",  # the console's numbers (1,234)
    "django.forms",  # the built-in widget templates, for the renderer below
    "corsheaders",
    "channels",
    "django_celery_beat",
    "gptload",
    "settings_app",
    "keys",
    "access",
    "logs",
    "proxy",
]
MIDDLEWARE = [
    "gptload.lib.apierrors.api_errors",  # first: every /api/ error in the API's shape, 405 included
    "django.middleware.security.SecurityMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",
    *(["corsheaders.middleware.CorsMiddleware"] if ENABLE_CORS else []),
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "gptload.urls"
ASGI_APPLICATION = "gptload.asgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
# The AUTH_KEY signs in as the built-in `gptload` superuser; Django users as themselves.
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "gptload.lib.signin.AuthKeyBackend",
]
LOGIN_URL = "/admin/login/"
LOGIN_REDIRECT_URL = "/admin/"
# Widgets render through TEMPLATES, so that the console's own (templates/gptload/widgets/)
# are found like any template.
FORM_RENDERER = "django.forms.renderers.TemplatesSetting"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
STATIC_URL = "static/"
# Set STATIC_ROOT (as the Docker image does) to serve collected files; without it the
# files are served straight from the apps' static folders, no collectstatic step needed.
STATIC_ROOT = env.string("STATIC_ROOT") or None
SERVESTATIC_USE_FINDERS = STATIC_ROOT is None
SECURE_CONTENT_TYPE_NOSNIFF = True
# Behind HTTPS: cookies sent over HTTPS only, and browsers told to use nothing else.
SECURE_COOKIES = env.boolean("SECURE_COOKIES", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_HTTPONLY = True
HSTS_SECONDS = env.integer("HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_SECONDS = HSTS_SECONDS
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.boolean("HSTS_INCLUDE_SUBDOMAINS", False)
# HSTS goes out on HTTPS requests only: behind a TLS-terminating proxy, uvicorn takes the
# scheme from X-Forwarded-Proto when the proxy is in FORWARDED_ALLOW_IPS.
SECURE_REFERRER_POLICY = "strict-origin-when-cross-origin"
X_FRAME_OPTIONS = "SAMEORIGIN"

CHANNEL_LAYERS = {
    "default": (
        {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_DSN]}}
        if REDIS_DSN
        else {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    )
}

# --- Celery (gptload/celery.py reads the CELERY_ names) ---
# Embedded mode: kombu's filesystem transport, beside the SQLite file it serves (two
# installations, or a test server, never share a queue).
CELERY_DATA_DIR = STATE_DIR / "celery"
CELERY_BROKER_URL = REDIS_DSN or "filesystem://"
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {}
    if REDIS_DSN
    else {
        "data_folder_in": str(CELERY_DATA_DIR / "queue"),
        "data_folder_out": str(CELERY_DATA_DIR / "queue"),
        "control_folder": str(CELERY_DATA_DIR / "control"),
        # The worker looks for a job every 0.1 s (kombu: 1 s): a job starts within 0.2 s
        # of its request. A look is one listdir of the queue folder, ~10 µs of CPU.
        "polling_interval": 0.1,
    }
)
CELERY_RESULT_BACKEND = None
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_IGNORE_RESULT = True
# django-celery-beat's database scheduler, noting beat's heartbeat as it turns.
CELERY_BEAT_SCHEDULER = "gptload.beat:Scheduler"
# Beat stores each schedule's "last run" as it sends the task (not every 3 minutes), so the
# console's Schedules page is current; a few small writes a minute.
CELERY_BEAT_SYNC_EVERY = 1
# Hourly statistics feed the dashboard's long views; they are pruned after this many
# days (0: never). Request logs follow the `request_log_retention_days` setting.
STATS_RETENTION_DAYS = env.integer("STATS_RETENTION_DAYS", 400, minimum=0)

# --- the console (Django admin with the Unfold theme; every asset served from here) ---
UNFOLD = {
    "SITE_TITLE": "gptload",
    "SITE_HEADER": "gptload",
    "SITE_SUBHEADER": _("AI gateway"),
    "SITE_SYMBOL": "fast_forward",
    "SITE_URL": "/admin/",
    "SITE_FAVICONS": [
        {"rel": "icon", "type": "image/x-icon", "href": "/static/gptload/favicon.ico"},
    ],
    "SCRIPTS": [lambda request: "/static/gptload/console.js"],
    "SHOW_HISTORY": True,
    "SHOW_VIEW_ON_SITE": False,
    "SHOW_LANGUAGES": True,
    "DASHBOARD_CALLBACK": "gptload.dashboard.dashboard_callback",
    "BORDER_RADIUS": "8px",
    "COLORS": {
        "primary": {
            "50": "238 242 255",
            "100": "224 231 255",
            "200": "199 210 254",
            "300": "165 180 252",
            "400": "129 140 248",
            "500": "99 102 241",
            "600": "79 70 229",
            "700": "67 56 202",
            "800": "55 48 163",
            "900": "49 46 129",
            "950": "30 27 75",
        },
    },
    "SIDEBAR": {
        "show_search": True,
        "show_all_applications": False,
        "navigation": [
            {
                "title": _("Gateway"),
                "items": [
                    {"title": _("Dashboard"), "icon": "dashboard", "link": "/admin/"},
                    {"title": _("Groups"), "icon": "hub", "link": "/admin/keys/group/"},
                    {"title": _("Keys"), "icon": "key", "link": "/admin/keys/apikey/"},
                    {
                        "title": _("Access keys"),
                        "icon": "badge",
                        "link": "/admin/access/accesskey/",
                    },
                    {
                        "title": _("Request logs"),
                        "icon": "receipt_long",
                        "link": "/admin/logs/requestlog/",
                    },
                    {
                        "title": _("Settings"),
                        "icon": "tune",
                        "link": "/admin/settings_app/systemsetting/",
                    },
                ],
            },
            {
                "title": _("Operations"),
                "collapsible": True,
                "items": [
                    {
                        "title": _("Key jobs"),
                        "icon": "pending_actions",
                        "link": "/admin/keys/keyjob/",
                    },
                    {
                        "title": _("Schedules"),
                        "icon": "schedule",
                        "link": "/admin/django_celery_beat/periodictask/",
                    },
                    {
                        "title": _("Hourly statistics"),
                        "icon": "bar_chart",
                        "link": "/admin/logs/hourlystat/",
                    },
                    {"title": _("Users"), "icon": "person", "link": "/admin/auth/user/"},
                    {"title": _("Roles"), "icon": "group", "link": "/admin/auth/group/"},
                ],
            },
        ],
    },
}
