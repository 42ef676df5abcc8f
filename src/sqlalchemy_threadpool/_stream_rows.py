"""The one source of rows of a stream: rows read ahead, then the server-side cursor behind them.

:class:`StreamRows` is a sync ``Result`` whose raw rows come first from a read-ahead deque,
then from the sync result of ``session.execute(..., stream_results=True)``. Every view of a
stream (see :mod:`._streams`) is SQLAlchemy's own sync view over one ``StreamRows``, so the
views share its position and see each row once, in order (invariant 10).

It touches the sync result only while a worker runs a call of the stream (``_io``); on the
loop it raises :class:`NeedRows` instead, and the caller reads a chunk ahead in a worker
(invariant 5). The chunk is ``STREAM_CHUNK_SIZE`` rows, or what ``yield_per()`` set. On MySQL
and MariaDB another statement on its connection first moves its unread rows to memory, and the
end of its transaction discards them (:mod:`._stream_sharing`): then a read that needs them
raises ``StreamClosedError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Result
from sqlalchemy.exc import ResourceClosedError

from ._exceptions import StreamClosedError
from ._stream_sharing import cursor_of, register

if TYPE_CHECKING:
    from ._offload import Offloader

__all__ = ["STREAM_CHUNK_SIZE", "NeedRows", "StreamRows"]

#: Raw rows read per worker call by ``async for`` and ``fetchone()``, and the default size
#: of ``fetchmany()`` / ``partitions()``, unless ``yield_per()`` (or the ``yield_per``
#: execution option) sets another.
STREAM_CHUNK_SIZE = 1000


class NeedRows(Exception):
    """Raised on the loop when a view needs rows that are not read ahead yet."""


class StreamRows(Result[Any]):
    """The one source of rows of a stream: rows read ahead, then the sync result behind them.

    A ``Result`` whose raw rows come first from the read-ahead deque, then from the sync
    result (the IO). Views are built on it as on any ``Result``, so they share its position.
    Outside a worker (``_io`` false) it never touches the sync result: it raises
    :class:`NeedRows` instead and the caller reads a chunk ahead in a worker.
    """

    def __init__(self, real: Result[Any], offloader: Offloader) -> None:
        super().__init__(real._metadata)
        self._real = real
        self._offloader = offloader
        self._ahead: deque[Any] = deque()
        self._exhausted = False  # the sync result returned no more rows
        self._hard_closed = False
        self._io = False  # a worker runs a call of this stream now
        self._busy = 0  # calls of this stream started on the loop and not finished
        self._unique_filter_state = real._unique_filter_state
        self._source_supports_scalars = real._source_supports_scalars
        self._yield_per = real._yield_per
        self._attributes = real._attributes
        if real._row_logging_fn is not None:  # echo="debug" logs rows as they are made
            self._row_logging_fn = real._row_logging_fn
        self._cursor = cursor_of(real)  # the server-side cursor behind it
        self._discarded: str | None = None  # how its transaction ended, if it discarded rows
        register(self)

    # -- on the loop --------------------------------------------------------------------

    def loop_may_read(self) -> bool:
        """Whether rows may be served on the loop now (no worker is inside this stream)."""
        return not self._busy and not self._offloader.interrupted

    @property
    def chunk_size(self) -> int:
        """Rows read per worker call: ``yield_per`` if set, else ``STREAM_CHUNK_SIZE``."""
        return self._yield_per or STREAM_CHUNK_SIZE

    def read_ahead(self) -> None:
        """Read a chunk of raw rows into the deque (runs in a worker)."""
        if not self._exhausted and not self._hard_closed:
            self._ahead.extend(self._read(self.chunk_size))

    def close_without_io(self) -> None:
        """Mark closed when the sync result is gone or already released."""
        self._hard_closed = True
        self._ahead.clear()
        if self._real._soft_closed and not self._real.closed:
            self._real.close()  # the cursor is released already: only bookkeeping

    # -- what SQLAlchemy's views call ---------------------------------------------------

    def _check_not_discarded(self) -> None:
        if self._discarded is not None:
            raise StreamClosedError(
                f"This stream's unread rows were discarded when its transaction ended "
                f"({self._discarded}) while it was open: MySQL and MariaDB keep one unbuffered "
                "result per connection, so they cannot outlive it. Read the stream to its end "
                "(or `await result.all()`) before the commit or rollback, or run the statements "
                "that must commit meanwhile in another session."
            )

    def _read(self, size: int | None) -> list[Any]:
        if self._exhausted:
            return []
        if not self._io:
            raise NeedRows
        self._check_not_discarded()
        rows = list(self._real._fetchmany_impl(size))
        if not rows:
            self._exhausted = True
        return rows

    def _check_open(self) -> None:
        if self._hard_closed:
            raise ResourceClosedError("This result object is closed.")

    def _fetchone_impl(self, hard_close: bool = False) -> Any:
        self._check_open()
        if self._ahead:
            return self._ahead.popleft()
        rows = self._read(1)
        if rows:
            return rows[0]
        if hard_close:
            self._soft_close(hard=True)
        return None

    def _fetchmany_impl(self, size: int | None = None) -> list[Any]:
        self._check_open()
        if size is None:
            size = self.chunk_size
        ahead = self._ahead
        if len(ahead) < size and not self._io and not self._exhausted:
            raise NeedRows  # before taking anything: nothing is lost
        rows = [ahead.popleft() for _ in range(min(size, len(ahead)))]
        if len(rows) < size:
            if rows and self._discarded is not None and not self._exhausted:
                return rows  # the last rows read ahead; the next read raises
            rows.extend(self._read(size - len(rows)))
        return rows

    def _fetchall_impl(self) -> list[Any]:
        self._check_open()
        if not self._exhausted and not self._io:
            raise NeedRows
        if not self._exhausted:
            self._check_not_discarded()
        rows = list(self._ahead)
        self._ahead.clear()
        if not self._exhausted:
            rows.extend(self._real._fetchall_impl())
            self._exhausted = True
        return rows

    def _fetchiter_impl(self) -> Iterator[Any]:
        while (row := self._fetchone_impl()) is not None:
            yield row

    def _raw_row_iterator(self) -> Iterator[Any]:
        if self._io:  # in a worker (``FrozenResult`` of a scalar source): read the rest at once
            return iter(self._fetchall_impl())
        return self._fetchiter_impl()

    def _soft_close(self, hard: bool = False, **kw: Any) -> None:
        if hard:
            self._hard_closed = True
            self._ahead.clear()
        self._real._soft_close(hard=hard)

    @property
    def _soft_closed(self) -> bool:
        return self._hard_closed or (not self._ahead and self._real._soft_closed)

    @property
    def closed(self) -> bool:
        return self._hard_closed or self._real.closed
