"""System checks of the messaging app."""

import sqlite3

import pytest
from django.db import connection

from messaging.checks import check_database


def test_an_sqlite_library_without_returning_is_refused(monkeypatch):
    """The send path needs INSERT ... RETURNING (SQLite 3.35): an older library is an error at
    start-up, not a failed send later."""
    if connection.vendor != "sqlite":
        pytest.skip("an SQLite check")
    assert check_database() == []
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    (error,) = check_database()
    assert error.id == "messaging.E004" and "3.31.1" in error.msg
