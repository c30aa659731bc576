"""
Messages, deliveries, rooms and their transport; `from messaging import publish, apublish`
sends from the server (messaging.publishing, docs/publish.md).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazily: the app's package is imported before the models may be.
    if name in ("publish", "apublish"):
        from messaging import publishing

        return getattr(publishing, name)
    raise AttributeError(f"module 'messaging' has no attribute {name!r}")
