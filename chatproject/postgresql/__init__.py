"""
Django's PostgreSQL backend with a connection pool whose checkout never sleeps on a broken
connection (ENGINE "chatproject.postgresql"; see pool.py).
"""
