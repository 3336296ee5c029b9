"""Clients of the kvstore daemon."""

from kvstore.client.aio import AsyncClient, ClientTLS, Fetched, LookupResult
from kvstore.client.sync import Client

__all__ = ["AsyncClient", "Client", "ClientTLS", "Fetched", "LookupResult"]
