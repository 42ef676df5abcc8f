"""Reads on a replica, writes on the primary: a routing ``Session`` behind a threadpool maker.

``RoutingSession.get_bind`` (SQLAlchemy's own hook, see "Custom Vertical Partitioning" in its
docs) picks the engine for each statement:

- a ``SELECT`` (not ``FOR UPDATE``) goes to the replica, unless the transaction already used
  the primary or the statement asks for it with ``.execution_options(primary=True)``;
- everything else (a flush, ``INSERT``/``UPDATE``/``DELETE``, ``text()``, ``connection()``)
  goes to the primary, and from then on the whole transaction reads there too, so it sees
  its own writes (*read-your-writes inside a transaction*);
- when the transaction ends (commit, rollback, close) the next one starts on the replica
  again. A replica applies the primary's commits a little later: a read in the next
  transaction may not see what the last one wrote yet; ask for the primary when it must.

Run it against a primary and a hot standby::

    PRIMARY_URL=postgresql+psycopg2://app@primary/app \\
    REPLICA_URL=postgresql+psycopg2://app@replica/app python read_replicas.py
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from sqlalchemy import Engine, Select, create_engine, event, select
from sqlalchemy.orm import Session, SessionTransaction

from sqlalchemy_threadpool import threadpool_sessionmaker

#: ``Session.info`` keys: the replica engine, and "this transaction used the primary".
REPLICA = "replica"
ON_PRIMARY = "on_primary"


class RoutingSession(Session):
    """A ``Session`` whose reads go to ``info["replica"]`` and writes to its ``bind``."""

    def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
        replica = self.info.get(REPLICA)
        if (
            replica is not None
            and not self.info.get(ON_PRIMARY)
            and not self._flushing
            and isinstance(clause, Select)
            and clause._for_update_arg is None
            and not clause.get_execution_options().get("primary")
        ):
            return replica
        self.info[ON_PRIMARY] = True  # the rest of this transaction stays on the primary
        return super().get_bind(mapper, clause=clause, **kw)


@event.listens_for(RoutingSession, "after_transaction_end")
def _back_to_the_replica(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended
        session.info.pop(ON_PRIMARY, None)


def routing_sessionmaker(primary: Engine, replica: Engine, **kw: Any) -> threadpool_sessionmaker:
    """A threadpool maker whose sessions read from ``replica`` and write to ``primary``.

    A session is admitted on the primary's capacity before its first call and on the
    replica's when it first reads there (each sized from its own pool), until its
    transaction ends: size each pool for the sessions that use it.
    """
    return threadpool_sessionmaker(
        primary, sync_session_class=RoutingSession, info={REPLICA: replica}, **kw
    )


async def main() -> None:
    from sqlalchemy import String
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "replica_example_item"
        name: Mapped[str] = mapped_column(String(50), primary_key=True)

    primary = create_engine(os.environ["PRIMARY_URL"], pool_size=5, max_overflow=0)
    replica = create_engine(os.environ["REPLICA_URL"], pool_size=5, pool_pre_ping=True)
    Base.metadata.create_all(primary)
    maker = routing_sessionmaker(primary, replica)
    async with maker() as sess, sess.begin():
        sess.add(Item(name="a"))  # written on the primary...
        await sess.flush()
        print((await sess.scalars(select(Item.name))).all())  # ...and read there: ['a']
    async with maker() as sess:  # a new transaction reads on the replica again
        names = (await sess.scalars(select(Item.name))).all()
        print(names)  # [] or ['a']: the replica may lag


if __name__ == "__main__":
    anyio.run(main)
