"""
The project's settings for tools that load them outside any deployment (mypy's django-stubs
plugin, `[tool.django-stubs]` in pyproject.toml): with a random DJANGO_SECRET_KEY when none is set,
as the settings refuse to load without one.
"""

from harness.deployment import ensure_secret_key

ensure_secret_key()

from chatproject.settings import *  # noqa: E402, F403
