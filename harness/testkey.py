"""
A pytest plugin (`-p harness.testkey` in pyproject.toml) that gives a test run a random
DJANGO_SECRET_KEY unless one is set. A plugin, not a conftest.py: pytest-django loads the settings,
which refuse to start without a key, before any conftest.py is read.
"""

from harness.deployment import ensure_secret_key

# The real servers that tests start inherit it, so sessions made in the test process are valid
# there too.
ensure_secret_key()
