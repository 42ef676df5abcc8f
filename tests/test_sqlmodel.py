"""SQLModel: ``sqlmodel_sessionmaker`` and ``await sess.exec(...)``, in a FastAPI app.

The app has the shape of SQLModel's "heroes" tutorial (teams, heroes, CRUD with offset/limit
and PATCH), written with ``async def`` endpoints over a blocking driver; it runs in process
through ``httpx.ASGITransport`` on asyncio and trio, on every test database.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' annotations at
# runtime, and ``SessionDep`` is local to ``heroes_app``.
import threading
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Query
from sqlalchemy import Engine, event
from sqlalchemy.orm import selectinload
from sqlmodel import Field, Relationship, SQLModel, col, delete, func, select, update

from helpers import checked_out
from sqlalchemy_threadpool import ThreadpoolAttrs, threadpool_object_session, threadpool_session
from sqlalchemy_threadpool.integrations.fastapi import session_dependency
from sqlalchemy_threadpool.integrations.sqlmodel import (
    ThreadpoolSQLModelSession,
    sqlmodel_sessionmaker,
)

pytestmark = pytest.mark.anyio


# -- the models, as in the tutorial ----------------------------------------------------------


class TeamBase(SQLModel):
    name: str = Field(index=True, max_length=100)
    headquarters: str = Field(max_length=100)


class Team(TeamBase, table=True):
    __tablename__ = "satp_sqlm_team"

    id: int | None = Field(default=None, primary_key=True)
    heroes: list["Hero"] = Relationship(back_populates="team")


class HeroBase(SQLModel):
    name: str = Field(index=True, max_length=100)
    secret_name: str = Field(max_length=100)
    age: int | None = Field(default=None, index=True)
    team_id: int | None = Field(default=None, foreign_key="satp_sqlm_team.id")


class Hero(ThreadpoolAttrs, HeroBase, table=True):
    __tablename__ = "satp_sqlm_hero"

    id: int | None = Field(default=None, primary_key=True)
    team: Team | None = Relationship(back_populates="heroes")


class HeroPublic(HeroBase):
    id: int


class HeroCreate(HeroBase):
    pass


class HeroUpdate(SQLModel):
    name: str | None = None
    secret_name: str | None = None
    age: int | None = None
    team_id: int | None = None


class TeamPublic(TeamBase):
    id: int


class HeroPublicWithTeam(HeroPublic):
    team: TeamPublic | None = None


class TeamPublicWithHeroes(TeamPublic):
    heroes: list[HeroPublic] = []


# -- the app -----------------------------------------------------------------------------------


def heroes_app(engine: Engine) -> FastAPI:
    maker = sqlmodel_sessionmaker(engine)
    SessionDep = Annotated[ThreadpoolSQLModelSession, session_dependency(maker)]
    app = FastAPI()

    @app.post("/teams/", response_model=TeamPublic)
    async def create_team(team: TeamBase, session: SessionDep) -> Team:
        db_team = Team.model_validate(team)
        session.add(db_team)
        await session.commit()
        await session.refresh(db_team)
        return db_team

    @app.get("/teams/{team_id}", response_model=TeamPublicWithHeroes)
    async def read_team(team_id: int, session: SessionDep) -> Team:
        heroes = selectinload(Team.heroes)  # type: ignore[arg-type]  # SQLModel's own typing
        statement = select(Team).where(col(Team.id) == team_id).options(heroes)
        team: Team | None = (await session.exec(statement)).one_or_none()
        if team is None:
            raise HTTPException(status_code=404, detail="Team not found")
        return team

    @app.post("/heroes/", response_model=HeroPublic)
    async def create_hero(hero: HeroCreate, session: SessionDep) -> Hero:
        db_hero = Hero.model_validate(hero)
        session.add(db_hero)
        await session.commit()
        await session.refresh(db_hero)
        return db_hero

    @app.get("/heroes/", response_model=list[HeroPublic])
    async def read_heroes(
        session: SessionDep, offset: int = 0, limit: Annotated[int, Query(le=100)] = 100
    ) -> Sequence[Hero]:
        statement = select(Hero).order_by(col(Hero.id)).offset(offset).limit(limit)
        return (await session.exec(statement)).all()

    @app.get("/heroes/{hero_id}", response_model=HeroPublicWithTeam)
    async def read_hero(hero_id: int, session: SessionDep) -> Hero:
        hero = await session.get(Hero, hero_id)
        if hero is None:
            raise HTTPException(status_code=404, detail="Hero not found")
        await hero.awaitable_attrs.team  # lazy: loaded in the session's worker
        return hero

    @app.patch("/heroes/{hero_id}", response_model=HeroPublic)
    async def update_hero(hero_id: int, hero: HeroUpdate, session: SessionDep) -> Hero:
        db_hero = await session.get(Hero, hero_id)
        if db_hero is None:
            raise HTTPException(status_code=404, detail="Hero not found")
        db_hero.sqlmodel_update(hero.model_dump(exclude_unset=True))
        session.add(db_hero)
        await session.commit()
        await session.refresh(db_hero)
        return db_hero

    @app.delete("/heroes/{hero_id}")
    async def delete_hero(hero_id: int, session: SessionDep) -> dict[str, bool]:
        hero = await session.get(Hero, hero_id)
        if hero is None:
            raise HTTPException(status_code=404, detail="Hero not found")
        await session.delete(hero)
        await session.commit()
        return {"ok": True}

    return app


@pytest.fixture
def tables(engine: Engine) -> Iterator[Engine]:
    SQLModel.metadata.drop_all(engine)
    SQLModel.metadata.create_all(engine)
    try:
        yield engine
    finally:
        SQLModel.metadata.drop_all(engine)


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_the_heroes_app_creates_reads_updates_and_deletes(tables: Engine) -> None:
    sql_threads: set[int] = set()

    def record(*args: Any) -> None:
        sql_threads.add(threading.get_ident())

    event.listen(tables, "before_cursor_execute", record)
    async with client(heroes_app(tables)) as c:
        team = await c.post("/teams/", json={"name": "Preventers", "headquarters": "Tower"})
        assert team.status_code == 200
        team_id = team.json()["id"]
        ids = []
        for name, age in [("Deadpond", None), ("Spider-Boy", 16), ("Rusty-Man", 48)]:
            body = {"name": name, "secret_name": f"{name} secret", "age": age, "team_id": team_id}
            created = await c.post("/heroes/", json=body)
            assert created.status_code == 200
            assert created.json()["name"] == name
            ids.append(created.json()["id"])

        page = await c.get("/heroes/", params={"offset": 1, "limit": 1})
        assert [h["name"] for h in page.json()] == ["Spider-Boy"]
        assert len((await c.get("/heroes/")).json()) == 3

        one = (await c.get(f"/heroes/{ids[0]}")).json()
        assert one["name"] == "Deadpond"
        assert one["team"] == {"name": "Preventers", "headquarters": "Tower", "id": team_id}

        patched = await c.patch(f"/heroes/{ids[1]}", json={"age": 17})
        assert patched.json()["age"] == 17
        assert patched.json()["secret_name"] == "Spider-Boy secret"  # unset fields untouched
        assert (await c.get(f"/heroes/{ids[1]}")).json()["age"] == 17

        assert (await c.delete(f"/heroes/{ids[2]}")).json() == {"ok": True}
        assert (await c.get(f"/heroes/{ids[2]}")).status_code == 404
        assert (await c.delete(f"/heroes/{ids[2]}")).status_code == 404

        members = (await c.get(f"/teams/{team_id}")).json()["heroes"]
        assert sorted(h["name"] for h in members) == ["Deadpond", "Spider-Boy"]
    assert sql_threads
    assert threading.get_ident() not in sql_threads  # every statement ran in a worker
    assert checked_out(tables) == 0


async def test_exec_returns_what_sqlmodels_async_session_returns(tables: Engine) -> None:
    maker = sqlmodel_sessionmaker(tables)
    async with threadpool_session(maker) as sess:
        assert isinstance(sess, ThreadpoolSQLModelSession)
        sess.add_all([Hero(name="a", secret_name="x", age=1), Hero(name="b", secret_name="y")])
        await sess.flush()
        heroes = (await sess.exec(select(Hero).order_by(col(Hero.name)))).all()
        assert [h.name for h in heroes] == ["a", "b"]
        assert threadpool_object_session(heroes[0]) is sess
        rows = (await sess.exec(select(Hero.name, Hero.age).order_by(col(Hero.name)))).all()
        assert [tuple(r) for r in rows] == [("a", 1), ("b", None)]
        assert (await sess.exec(select(func.count()).select_from(Hero))).one() == 2
        updated = await sess.exec(update(Hero).where(col(Hero.name) == "b").values(age=2))
        assert updated.rowcount == 1
        await sess.exec(delete(Hero).where(col(Hero.name) == "a"))
        assert (await sess.exec(select(Hero.age))).all() == [2]


def test_the_maker_needs_a_sqlmodel_session_class(engine: Engine) -> None:
    from sqlalchemy.orm import Session

    with pytest.raises(TypeError, match=r"must be sqlmodel\.Session"):
        sqlmodel_sessionmaker(engine, sync_session_class=Session)  # type: ignore[arg-type]
