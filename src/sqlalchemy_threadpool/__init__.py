"""Use a synchronous SQLAlchemy ``Session`` from asyncio and trio without blocking the loop.

.. code-block:: python

    Session = threadpool_sessionmaker(engine)

    async with threadpool_session(Session) as sess:
        users = await sess.run(lambda s: s.scalars(select(User)))
"""

from ._attrs import ThreadpoolAttrs as ThreadpoolAttrs
from ._attrs import threadpool_object_session as threadpool_object_session
from ._attrs import threadpool_session_of as threadpool_session_of
from ._connection import ThreadpoolConnection as ThreadpoolConnection
from ._context import bind_session as bind_session
from ._context import current_session as current_session
from ._context import get_default_sessionmaker as get_default_sessionmaker
from ._context import set_default_sessionmaker as set_default_sessionmaker
from ._context import threadpool_session as threadpool_session
from ._engine import ThreadpoolEngine as ThreadpoolEngine
from ._engine import create_threadpool_engine as create_threadpool_engine
from ._engine import threadpool_engine_from_config as threadpool_engine_from_config
from ._exceptions import AdmissionTimeoutError as AdmissionTimeoutError
from ._exceptions import BlockingOnEventLoopError as BlockingOnEventLoopError
from ._exceptions import BlockingOnEventLoopWarning as BlockingOnEventLoopWarning
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import ConfigurationWarning as ConfigurationWarning
from ._exceptions import EventLoopConflictError as EventLoopConflictError
from ._exceptions import LazyLoadOnEventLoopError as LazyLoadOnEventLoopError
from ._exceptions import NoSessionError as NoSessionError
from ._exceptions import SessionClosedError as SessionClosedError
from ._exceptions import SessionOwnershipError as SessionOwnershipError
from ._exceptions import StreamClosedError as StreamClosedError
from ._exceptions import ThreadpoolSessionError as ThreadpoolSessionError
from ._exceptions import TransactionInterruptedError as TransactionInterruptedError
from ._guard import allow_blocking as allow_blocking
from ._maker import threadpool_sessionmaker as threadpool_sessionmaker
from ._retry import is_retryable as is_retryable
from ._retry import run_transaction as run_transaction
from ._scoping import threadpool_scoped_session as threadpool_scoped_session
from ._session import ThreadpoolSession as ThreadpoolSession
from ._shutdown import shutdown as shutdown
from ._stats import ThreadpoolStats as ThreadpoolStats
from ._stats import engine_stats as engine_stats
from ._streams import ThreadpoolMappingResult as ThreadpoolMappingResult
from ._streams import ThreadpoolResult as ThreadpoolResult
from ._streams import ThreadpoolScalarResult as ThreadpoolScalarResult
from ._streams import ThreadpoolStreamMappingResult as ThreadpoolStreamMappingResult
from ._streams import ThreadpoolStreamResult as ThreadpoolStreamResult
from ._streams import ThreadpoolStreamScalarResult as ThreadpoolStreamScalarResult
from ._streams import ThreadpoolTupleResult as ThreadpoolTupleResult
from ._transaction import ThreadpoolSessionTransaction as ThreadpoolSessionTransaction
from ._transaction import ThreadpoolTransaction as ThreadpoolTransaction
from ._worker_pool import WorkerPool as WorkerPool

__all__ = [
    "AdmissionTimeoutError",
    "BlockingOnEventLoopError",
    "BlockingOnEventLoopWarning",
    "ConfigurationError",
    "ConfigurationWarning",
    "EventLoopConflictError",
    "LazyLoadOnEventLoopError",
    "NoSessionError",
    "SessionClosedError",
    "SessionOwnershipError",
    "StreamClosedError",
    "ThreadpoolAttrs",
    "ThreadpoolConnection",
    "ThreadpoolEngine",
    "ThreadpoolMappingResult",
    "ThreadpoolResult",
    "ThreadpoolScalarResult",
    "ThreadpoolSession",
    "ThreadpoolSessionError",
    "ThreadpoolSessionTransaction",
    "ThreadpoolStats",
    "ThreadpoolStreamMappingResult",
    "ThreadpoolStreamResult",
    "ThreadpoolStreamScalarResult",
    "ThreadpoolTransaction",
    "ThreadpoolTupleResult",
    "TransactionInterruptedError",
    "WorkerPool",
    "allow_blocking",
    "bind_session",
    "create_threadpool_engine",
    "current_session",
    "engine_stats",
    "get_default_sessionmaker",
    "is_retryable",
    "run_transaction",
    "set_default_sessionmaker",
    "shutdown",
    "threadpool_engine_from_config",
    "threadpool_object_session",
    "threadpool_scoped_session",
    "threadpool_session",
    "threadpool_session_of",
    "threadpool_sessionmaker",
]

__version__ = "0.1.0"
