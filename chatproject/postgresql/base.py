"""
Django's PostgreSQL backend, pooled through chatproject.postgresql.pool.ConnectionPool.
"""

from typing import Any

from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base

from chatproject.postgresql.pool import ConnectionPool


class DatabaseWrapper(base.DatabaseWrapper):
    """
    The PostgreSQL backend; with OPTIONS["pool"], its pool is one whose checkout never sleeps.
    """

    @property
    def pool(self) -> Any:
        options = self.settings_dict["OPTIONS"].get("pool")
        if options and self.alias != NO_DB_ALIAS and self.alias not in self._connection_pools:
            # As Django 5.2 makes its pool (django/db/backends/postgresql/base.py), with this
            # pool class; Django's property then finds it made.
            if self.settings_dict.get("CONN_MAX_AGE", 0) == 0:
                params = self.get_connection_params()
                params["autocommit"] = True  # Django sets the connection's own later
                pool = ConnectionPool(
                    kwargs=params,
                    open=False,
                    configure=self._configure_connection,
                    check=(
                        ConnectionPool.check_connection
                        if self.settings_dict["CONN_HEALTH_CHECKS"]
                        else None
                    ),
                    **({} if options is True else options),
                )
                self._connection_pools.setdefault(self.alias, pool)
        return super().pool
