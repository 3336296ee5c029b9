"""Tests of the daemon's clients (``kvstore.Client``, ``kvstore.AsyncClient``)."""
