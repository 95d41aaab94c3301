"""``iotpipe dashboard``: the query API v1 (``docs/api.md``) and the web page over a SQLite store.

:mod:`~consumers.dashboard.queries` reads the store (read-only), :mod:`~consumers.dashboard.api`
holds the API's routes, :mod:`~consumers.dashboard.app` assembles them with the error handlers and
the page into a FastAPI application, :mod:`~consumers.dashboard.cli` is the command.
"""
