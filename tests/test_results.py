"""Stream results mirror ``AsyncResult`` member for member, and their new members work.

``ThreadpoolResult`` / ``ThreadpoolScalarResult`` / ``ThreadpoolMappingResult`` /
``ThreadpoolTupleResult`` against ``sqlalchemy.ext.asyncio``'s four result classes on the
installed SQLAlchemy; then ``tuples()`` / ``t``, ``freeze()``, ``yield_per()`` and ``keys()``
on real databases, keeping the one-position invariant (every row once, in order).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.engine import FrozenResult, Result
from sqlalchemy.ext.asyncio import result as async_result
from typing_extensions import Unpack

from helpers import Overlap, checked_out
from models import User
from sqlalchemy_threadpool import (
    ThreadpoolMappingResult,
    ThreadpoolResult,
    ThreadpoolScalarResult,
    ThreadpoolStreamMappingResult,
    ThreadpoolStreamResult,
    ThreadpoolStreamScalarResult,
    ThreadpoolTupleResult,
    threadpool_session,
    threadpool_sessionmaker,
)

#: (ours, SQLAlchemy's) for every result class of the rename table.
PAIRS = [
    (ThreadpoolResult, async_result.AsyncResult),
    (ThreadpoolScalarResult, async_result.AsyncScalarResult),
    (ThreadpoolMappingResult, async_result.AsyncMappingResult),
    (ThreadpoolTupleResult, async_result.AsyncTupleResult),
]

#: Public names SQLAlchemy's classes inherit from its memoization helper, not result API.
_NOT_RESULT_API = {"memoized_attribute", "memoized_instancemethod"}


def _members(cls: type) -> set[str]:
    """Public members and async-iteration dunders, including ``if TYPE_CHECKING:`` ones.

    ``AsyncTupleResult`` declares its API for type checkers only, so the class source is
    read as well as ``dir()``.
    """
    names = {n for n in dir(cls) if not n.startswith("_")} - _NOT_RESULT_API
    names |= {n for n in ("__aiter__", "__anext__") if hasattr(cls, n)}
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
            not node.name.startswith("_") or node.name in ("__aiter__", "__anext__")
        ):
            names.add(node.name)
    return names


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_result_classes_have_every_member_of_sqlalchemys(ours: type, theirs: type) -> None:
    missing = _members(theirs) - _members(ours)
    assert not missing, f"{ours.__name__} lacks {sorted(missing)} of {theirs.__name__}"
    for name in _members(theirs) & set(vars(theirs)):
        if inspect.iscoroutinefunction(vars(theirs)[name]):
            assert inspect.iscoroutinefunction(getattr(ours, name)), f"{name} must be async"


def test_the_stream_names_are_aliases() -> None:
    assert ThreadpoolStreamResult is ThreadpoolResult
    assert ThreadpoolStreamScalarResult is ThreadpoolScalarResult
    assert ThreadpoolStreamMappingResult is ThreadpoolMappingResult


async def _seed_users(engine: Engine, count: int) -> list[int]:
    async with threadpool_session(threadpool_sessionmaker(engine)) as sess:
        await sess.execute(insert(User), [{"name": f"user{i:05}"} for i in range(count)])
        return list(await sess.scalars(select(User.id).order_by(User.id)))


_IDS_AND_NAMES = select(User.id, User.name).order_by(User.id)


def _count_reads(
    result: ThreadpoolResult[Unpack[tuple[Any, ...]]], fetches: Overlap, sizes: list[Any]
) -> None:
    """Count the reads from the sync result (the IO), as the 10 000-row test does."""
    real = result._rows._real
    original = real._fetchmany_impl

    def counted(size: int | None = None) -> Any:
        with fetches.inside():
            sizes.append(size)
            return original(size)

    real._fetchmany_impl = counted  # type: ignore[method-assign]


@pytest.mark.anyio
async def test_tuples_and_t_are_tuple_views_at_the_same_position(engine: Engine) -> None:
    ids = await _seed_users(engine, 6)
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(_IDS_AND_NAMES) as result:
            first = await result.__anext__()
            assert isinstance(result.t, ThreadpoolTupleResult)
            second = await result.t.fetchone()
            assert second is not None
            id_, name = second
            two = await result.tuples().fetchmany(2)
            rest = [row async for row in result.t]
        assert [first.id, id_, *(r[0] for r in two), *(r[0] for r in rest)] == ids
        assert name == "user00001"
        one_column = await sess.stream(select(User.id).where(User.id == ids[2]))
        assert await one_column.t.scalar_one() == ids[2]
        assert one_column.closed
    assert checked_out(engine) == 0


@pytest.mark.anyio
async def test_freeze_fetches_the_rest_in_a_worker(engine: Engine) -> None:
    ids = await _seed_users(engine, 5)
    async with threadpool_sessionmaker(engine)() as sess:
        result = await sess.stream(_IDS_AND_NAMES)
        first = await result.__anext__()
        real = result._rows._real
        threads: list[int] = []
        original = real._fetchall_impl

        def recorded() -> Any:
            threads.append(threading.get_ident())
            return original()

        real._fetchall_impl = recorded  # type: ignore[method-assign]
        frozen = await result.freeze()
        assert isinstance(frozen, FrozenResult)
        assert threads
        assert threading.get_ident() not in threads  # the rest was read in a worker
        again = frozen()  # a new buffered sync Result, each time it is called
        assert isinstance(again, Result)
        assert [first.id, *(r.id for r in again.all())] == ids
        assert [r.name for r in frozen().all()] == [f"user{i:05}" for i in range(1, 5)]
        await result.close()

        entities = await sess.stream(select(User).order_by(User.id))  # a scalar source
        head = await entities.scalars().fetchmany(2)
        frozen_users = await entities.freeze()
        users = frozen_users().scalars().all()
        assert [u.id for u in [*head, *users]] == ids
        await entities.close()
    assert checked_out(engine) == 0


@pytest.mark.anyio
async def test_yield_per_sets_the_rows_read_per_worker_call(engine: Engine) -> None:
    ids = await _seed_users(engine, 1000)
    async with threadpool_sessionmaker(engine)() as sess:
        default_fetches, default_sizes = Overlap(), list[Any]()
        async with await sess.stream(_IDS_AND_NAMES) as result:
            _count_reads(result, default_fetches, default_sizes)
            assert len([row async for row in result]) == 1000
        assert default_fetches.calls <= 2  # one chunk of 1000, then the empty read

        fetches, sizes = Overlap(), list[Any]()
        async with await sess.stream(_IDS_AND_NAMES) as result:
            _count_reads(result, fetches, sizes)
            scalars = result.scalars()
            assert scalars.yield_per(100) is scalars  # in place, for every view
            seen = [await scalars.__anext__()]
            seen.extend([row.id async for row in result])
        assert seen == ids
        assert 10 <= fetches.calls <= 11  # a chunk of 100 per worker call
        assert set(sizes) == {100}

        async with await sess.stream(_IDS_AND_NAMES) as result:
            mappings = result.mappings().yield_per(300)
            assert [len(part) async for part in mappings.partitions()] == [300, 300, 300, 100]
    assert checked_out(engine) == 0


@pytest.mark.anyio
async def test_keys_of_rows_and_mappings(engine: Engine) -> None:
    await _seed_users(engine, 2)
    sess = threadpool_sessionmaker(engine)()
    async with sess, await sess.stream(_IDS_AND_NAMES) as result:
        assert list(result.keys()) == ["id", "name"]
        mappings = result.mappings()
        assert list(mappings.keys()) == ["id", "name"]
        assert list(mappings.columns("name").keys()) == ["name"]
        assert list(result.columns("name").keys()) == ["name"]
        row = await result.fetchone()
        assert row is not None
        assert tuple(row) == ("user00000",)


@pytest.mark.anyio
async def test_new_views_share_one_position(engine: Engine) -> None:
    ids = await _seed_users(engine, 2500)  # more than one chunk
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(_IDS_AND_NAMES) as result:
            result.yield_per(300)
            seen: list[int] = []
            while len(seen) < 1500:
                seen.append((await result.__anext__()).id)
                row = await result.t.fetchone()
                assert row is not None
                seen.append(row[0])
                seen.extend(r[0] for r in await result.tuples().fetchmany(4))
                async for i, _name in result.t:
                    seen.append(i)
                    if i % 5 == 0:
                        break
                seen.extend(await result.scalars().yield_per(7).fetchmany())
                mapping = await result.mappings().fetchone()
                assert mapping is not None
                seen.append(mapping["id"])
            frozen = await result.freeze()
            seen.extend(r.id for r in frozen())
            assert await result.fetchone() is None
        assert seen == ids
    assert checked_out(engine) == 0
