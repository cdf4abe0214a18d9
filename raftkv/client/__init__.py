"""The raftkv client SDK: ``open_client`` (trio) and ``Client`` (synchronous)."""

from raftkv.client.client import AsyncClient, WriteResult, open_client
from raftkv.client.sync import Client

__all__ = ["AsyncClient", "Client", "WriteResult", "open_client"]
