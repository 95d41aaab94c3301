"""``iotpipe dashboard``: the query API v1 (``docs/api.md``) and the web page over a SQLite store.

:mod:`~consumers.dashboard.queries` reads the store (read-only), :mod:`~consumers.dashboard.app`
serves it over HTTP (FastAPI), :mod:`~consumers.dashboard.cli` is the command.
"""
