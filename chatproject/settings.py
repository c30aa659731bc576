"""
Settings for the chat project.

Everything that varies between machines comes from the environment, and only here:
DATABASE_URL (PostgreSQL; SQLite when unset), REDIS_URL (channels-redis; the in-memory
layer when unset), DJANGO_SECRET_KEY, DJANGO_DEBUG, DJANGO_ALLOWED_HOSTS, the HTTPS settings
of docs/deployment.md, and METRICS_TOKEN / METRICS_ALLOWED_IPS (docs/metrics.md).
"""

import os
import socket
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

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


# Off unless asked for (`make run` asks). There is no fallback key: a server that signed sessions
# with a key from the source code would start silently; refusing to start is the safer failure.
DEBUG = _env_bool("DJANGO_DEBUG", False)
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is not set. Set it to a long random value kept secret, e.g. "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(50))' (docs/deployment.md); "
        "`make run` makes a development key of its own."
    )
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
# HTTPS behind a TLS-terminating proxy (docs/deployment.md, deploy/production.env). The proxy
# header is "HEADER,value", e.g. HTTP_X_FORWARDED_PROTO,https; the proxy must set it on every
# request, or a client could claim HTTPS.
SECURE_SSL_REDIRECT = _env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS", "0"))
SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
if os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER"):
    _header, _, _value = os.environ["DJANGO_SECURE_PROXY_SSL_HEADER"].partition(",")
    SECURE_PROXY_SSL_HEADER = (_header.strip(), _value.strip())
SESSION_COOKIE_SECURE = _env_bool("DJANGO_SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = _env_bool("DJANGO_CSRF_COOKIE_SECURE", False)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "clients",
    "messaging",
]

MIDDLEWARE = [
    # First: a bad Host or unparseable request data is a 400 before any other middleware reads it.
    "messaging.middleware.RefuseUnreadableRequests",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into chatproject.lockout's answer.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    # First: refuses any login (the right password too) while its account or address is locked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

# Login throttling (django-axes; docs/security.md). After AXES_FAILURE_LIMIT failed logins for
# one username, or from one address, within AXES_COOLOFF_TIME, logins of that username and from
# that address are refused until the failures are that old. Attempts live in the database, so
# every process counts them. A successful login clears the failures of that username from that
# address only (not all of the address's: a user could wipe the count of the accounts it guesses).
AXES_FAILURE_LIMIT = int(os.environ.get("LOGIN_FAILURE_LIMIT", "5"))
AXES_COOLOFF_TIME = timedelta(seconds=float(os.environ.get("LOGIN_COOLOFF_SECONDS", "900")))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_HANDLER = "chatproject.lockout.LoginAttempts"
AXES_LOCKOUT_CALLABLE = "chatproject.lockout.locked_out"
AXES_CLIENT_IP_CALLABLE = "chatproject.lockout.client_ip"
AXES_DISABLE_ACCESS_LOG = True  # no table row per successful login
# Proxies in front that append to X-Forwarded-For (nginx: 1). 0: the address is the peer's own,
# and X-Forwarded-For (which anyone can send) is ignored.
AXES_IPWARE_PROXY_COUNT = int(os.environ.get("DJANGO_PROXY_COUNT", "0"))

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


def _env_seconds(name: str) -> float | None:
    """A duration in seconds from the environment; unset, empty or "none" means no limit."""
    raw = os.environ.get(name, "").strip().lower()
    return None if raw in {"", "none"} else float(raw)


# TCP keepalive on Redis connections: a silent dead peer is noticed within about 30 s.
_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4))
    if hasattr(socket, name)
}

if os.environ.get("REDIS_URL"):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "messaging.layers.RedisChannelLayer",
            "CONFIG": {
                # No read timeout on the layer's connections. redis-py 8 defaults it to 5 s,
                # exactly channels-redis's blocking BZPOPMIN of 5 s (idle sockets died with
                # 1011); and with any read timeout, a cancelled receive() now and then does not
                # end: the cancellation becomes a read timeout, which redis-py retries, and
                # channels-redis pops again (tests/test_loop_shutdown.py). Reads stay bounded by the
                # server's 5 s pop; a dead peer is found by TCP keepalive, and every other call
                # gives up after REDIS_OP_TIMEOUT seconds (messaging.layers).
                "hosts": [
                    {
                        "address": os.environ["REDIS_URL"],
                        "socket_timeout": _env_seconds("REDIS_SOCKET_TIMEOUT"),
                        "socket_keepalive": True,
                        "socket_keepalive_options": _KEEPALIVE,
                        "socket_connect_timeout": 5.0,
                        # redis-py 8 caps a pool at 100 connections and then fails at once
                        # (MaxConnectionsError): a process with 100 busy sockets (group joins,
                        # pings, pushes) lost pokes that way, and its tabs waited for their
                        # next ping.
                        "max_connections": int(os.environ.get("REDIS_MAX_CONNECTIONS", "1000")),
                    }
                ],
                "op_timeout": float(os.environ.get("REDIS_OP_TIMEOUT", "5")),
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
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT", str(BASE_DIR / "staticfiles")))
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

if os.environ.get("REDIS_URL"):
    # The send rate limits hold across processes through the same Redis (messaging.ratelimit).
    MESSAGING_RATE_REDIS_URL = os.environ["REDIS_URL"]
    MESSAGING_RATE_REDIS_PREFIX = os.environ.get("REDIS_PREFIX", "asgi")


def _env_setting(raw: str) -> object:
    """An app setting from the environment: a number, none/true/false, or else the text."""
    lowered = raw.strip().lower()
    if lowered in {"none", "null", ""}:
        return None
    if lowered in {"true", "false"}:
        return lowered == "true"
    try:
        return float(raw) if any(c in raw for c in ".eE") else int(raw)
    except ValueError:
        return raw


# Prometheus metrics (/metrics, docs/metrics.md): off unless a token or allowed addresses are set.
# Read as text here, not by the generic loop below, which would turn a numeric token into a number.
MESSAGING_METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "").strip() or None
MESSAGING_METRICS_ALLOWED_IPS = [
    a.strip() for a in os.environ.get("METRICS_ALLOWED_IPS", "").split(",") if a.strip()
]
# Scraped over plain HTTP on daphne's loopback port: not redirected to HTTPS.
SECURE_REDIRECT_EXEMPT = [r"^metrics$"]
# Settings that are text whatever they look like (a token of digits stays a string).
_TEXT_SETTINGS = {"MESSAGING_SERVER_API_TOKEN", "MESSAGING_SERVER_SENDER"}

# Every app setting (clients/conf.py, messaging/conf.py) can also come from the environment.
for _name, _raw in os.environ.items():
    if _name in _TEXT_SETTINGS:
        globals()[_name] = _raw.strip() or None
    elif _name.startswith(("MESSAGING_", "CLIENTS_")):
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
