"""
Settings for the chat project.

Everything that varies between machines comes from the environment, and only here:
DATABASE_URL (PostgreSQL; SQLite when unset), REDIS_URL (channels-redis; the in-memory
layer when unset), DJANGO_SECRET_KEY, DJANGO_DEBUG, DJANGO_ALLOWED_HOSTS.
"""

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _database_from_url(url: str) -> dict:
    """Turn postgres://user:password@host:port/name?opt=v into a DATABASES entry."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ValueError(f"DATABASE_URL: unsupported scheme {parts.scheme!r} (use postgres://)")
    options: dict = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    pool_size = int(os.environ.get("DATABASE_POOL", "20"))
    if pool_size > 0:
        # A connection pool per process (psycopg_pool through Django; with CONN_HEALTH_CHECKS
        # each connection is checked on checkout). Under ASGI every request runs in a thread of
        # its own, so persistent connections (CONN_MAX_AGE) are never reused and pile up;
        # opening one per database call instead cost more than the call (the chaos run
        # measured ~5 sends/s).
        min_size = min(pool_size, int(os.environ.get("DATABASE_POOL_MIN", "2")))
        options["pool"] = {"min_size": min_size, "max_size": pool_size, "timeout": 10}
    return {
        # Django's backend, with a pool that discards broken connections without sleeping
        # (chatproject/postgresql/pool.py).
        "ENGINE": "chatproject.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": options,
        "CONN_MAX_AGE": int(os.environ.get("DATABASE_CONN_MAX_AGE", "0")),
        "CONN_HEALTH_CHECKS": True,
        # Per process, so parallel test runs on one machine do not share a test database.
        "TEST": {"NAME": os.environ.get("DATABASE_TEST_NAME") or f"test_tabrelay_{os.getpid()}"},
    }


SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "dev-only-insecure-key-set-DJANGO_SECRET_KEY-in-production"
)
DEBUG = _env_bool("DJANGO_DEBUG", True)
ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(
        ","
    )
    if h.strip()
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "clients",
    "messaging",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatproject.urls"
CSRF_FAILURE_VIEW = "messaging.views.csrf_failure"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

WSGI_APPLICATION = None
ASGI_APPLICATION = "chatproject.asgi.application"

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": _database_from_url(os.environ["DATABASE_URL"])}
else:
    # SQLite with concurrent HTTP and WebSocket writers: IMMEDIATE transactions take the write
    # lock up front (no "database is locked" upgrade failures), WAL lets readers run alongside.
    _sqlite_path = os.environ.get("SQLITE_PATH", str(BASE_DIR / "var" / "db.sqlite3"))
    Path(_sqlite_path).parent.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _sqlite_path,
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # On disk, not in memory, so connection-closing bugs show up in tests too.
            "TEST": {
                "NAME": os.environ.get(
                    "SQLITE_TEST_PATH", str(BASE_DIR / "var" / f"test-{os.getpid()}.sqlite3")
                )
            },
        }
    }

if os.environ.get("REDIS_URL"):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 defaults socket_timeout to 5 s, exactly channels-redis's blocking
                # BZPOPMIN of 5 s: idle sockets' receive loops then die with a read timeout
                # (1011). Reads must be allowed to outlast the blocking pop.
                "hosts": [
                    {
                        "address": os.environ["REDIS_URL"],
                        "socket_timeout": float(os.environ.get("REDIS_SOCKET_TIMEOUT", "30")),
                        "socket_connect_timeout": 5.0,
                        # redis-py 8 caps a pool at 100 connections and then fails at once
                        # (MaxConnectionsError): a process with 100 busy sockets (group joins,
                        # pings, pushes) lost pokes that way, and its tabs waited for their
                        # next ping.
                        "max_connections": int(os.environ.get("REDIS_MAX_CONNECTIONS", "1000")),
                    }
                ],
                "prefix": os.environ.get("REDIS_PREFIX", "asgi"),
                "capacity": int(os.environ.get("CHANNEL_LAYER_CAPACITY", "1000")),
                "expiry": 60,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "messaging.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": int(os.environ.get("CHANNEL_LAYER_CAPACITY", "1000"))},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Django's hashers unless PASSWORD_HASHERS (comma-separated dotted paths) says otherwise; the
# test harness's throwaway deployments use a fast one, as password hashing is not under test.
if os.environ.get("PASSWORD_HASHERS"):
    PASSWORD_HASHERS = [h.strip() for h in os.environ["PASSWORD_HASHERS"].split(",") if h.strip()]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# daphne serves static files itself when set (Django's ASGIStaticFilesHandler): handy for the
# multi-process deployment without a separate web server in front.
SERVE_STATIC = _env_bool("SERVE_STATIC", False)

# Python's garbage collector in the server processes (chatproject/asgi.py): what was loaded at
# start-up is frozen (never scanned again), and collections run less often than Python's
# (700, 10, 10). With 1,000 sockets a full collection scanned them all and paused the event loop
# for 55-250 ms every few seconds, the largest part of fan-out's p99. "off": Python's defaults.
_gc = os.environ.get("SERVER_GC_THRESHOLDS", "10000,50,100")
SERVER_GC_THRESHOLDS = None if _gc == "off" else tuple(int(x) for x in _gc.split(","))

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# App settings (defaults live in clients/conf.py and messaging/conf.py); set here to override.


def _env_setting(raw: str) -> object:
    """An app setting from the environment: a number, or none/true/false."""
    lowered = raw.strip().lower()
    if lowered in {"none", "null", ""}:
        return None
    if lowered in {"true", "false"}:
        return lowered == "true"
    return float(raw) if any(c in raw for c in ".eE") else int(raw)


# Every app setting (clients/conf.py, messaging/conf.py) can also come from the environment.
for _name, _raw in os.environ.items():
    if _name.startswith(("MESSAGING_", "CLIENTS_")):
        globals()[_name] = _env_setting(_raw)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
    },
}
