"""
Real deployments for tests, the chaos tool and the benchmarks: daphne processes, their database,
their channel layer (optionally a private redis-server that can be restarted) and fault proxies.
"""

from harness.deployment import Deployment, RedisServer, Server, free_port

__all__ = ["Deployment", "RedisServer", "Server", "free_port"]
