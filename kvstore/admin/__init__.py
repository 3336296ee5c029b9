"""Operating a running daemon: the ``kvstore admin`` command and its helpers.

* :mod:`kvstore.admin.client`: :class:`AdminClient`, a blocking client of the
  ``kvstore.v1.Admin`` gRPC service (the servicer is
  :mod:`kvstore.server.admin`);
* :mod:`kvstore.admin.cli`: the ``kvstore admin <command>`` subcommands;
* :mod:`kvstore.admin.table`: human-readable tables and sizes;
* :mod:`kvstore.admin.recode`: re-encoding one chunk with another codec
  (run by the daemon for ``Recode``).
"""

from __future__ import annotations

__all__ = ["AdminClient"]

from kvstore.admin.client import AdminClient
