"""Clients of the kvstore daemon."""

from kvstore.client.aio import AsyncClient, LookupResult
from kvstore.client.channel import ClientTLS
from kvstore.client.payload import Fetched
from kvstore.client.sync import Client

__all__ = ["AsyncClient", "Client", "ClientTLS", "Fetched", "LookupResult"]
