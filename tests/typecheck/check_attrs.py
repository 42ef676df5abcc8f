"""Type checks of ``ThreadpoolAttrs`` and the session look-ups (see README.md beside it)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession, async_object_session, async_session
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from typing_extensions import assert_type

from sqlalchemy_threadpool import (
    ThreadpoolAttrs,
    ThreadpoolSession,
    threadpool_object_session,
    threadpool_session_of,
)

from ._helpers import same_as_async_session


class Base(ThreadpoolAttrs, DeclarativeBase):
    pass


class Node(Base):
    __tablename__ = "node"

    id: Mapped[int] = mapped_column(primary_key=True)
    children: Mapped[list[Node]] = relationship()


class AsyncBase(AsyncAttrs, DeclarativeBase):
    pass


class AsyncNode(AsyncBase):
    __tablename__ = "async_node"

    id: Mapped[int] = mapped_column(primary_key=True)


async def check_awaitable_attrs(node: Node, async_node: AsyncNode) -> None:
    assert_type(node.awaitable_attrs, ThreadpoolAttrs._ThreadpoolAttrGetitem)
    assert_type(node.awaitable_attrs.children, Awaitable[Any])
    assert_type(await node.awaitable_attrs.children, Any)
    same_as_async_session([node.awaitable_attrs.id], [async_node.awaitable_attrs.id])
    same_as_async_session([await node.awaitable_attrs.id], [await async_node.awaitable_attrs.id])


def check_object_session(node: Node, sync_session: Session, sess: ThreadpoolSession) -> None:
    assert_type(threadpool_object_session(node), ThreadpoolSession | None)
    assert_type(threadpool_session_of(sync_session), ThreadpoolSession | None)
    assert_type(async_object_session(node), AsyncSession | None)
    assert_type(async_session(sync_session), AsyncSession | None)
    threadpool_session_of(sess)  # type: ignore[arg-type]
