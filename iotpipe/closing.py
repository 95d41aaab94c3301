"""``Closing``: the ``with`` protocol for objects that end with ``close()``.

The durable queue, its wrappers (edge outbox, bridge spool and its writer) and the recording
reader and writer all open a file in their constructor and release it in ``close()``; this base
gives each of them ``with Thing(...) as thing:`` once.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """Base class: ``__enter__`` returns the object, ``__exit__`` calls :meth:`close`."""

    __slots__ = ()

    def close(self) -> object:
        """Release what the object holds; subclasses implement it (idempotently)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
