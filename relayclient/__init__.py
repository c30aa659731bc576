"""
An asyncio client of the tab relay protocol (protocol version 1), for programs, load tools,
the chaos checker and tests: one instance is one tab.
"""

from relayclient.client import RelayClient, SendFailed

__all__ = ["RelayClient", "SendFailed"]
