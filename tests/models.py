"""Small ORM models shared by the tests.

``User.posts`` is a lazy ``select`` relationship and ``User.bio`` a deferred column, so the
guard tests have both kinds of load that would do IO on attribute access. String lengths are
set so that MariaDB accepts the schema.
"""

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "satp_user"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    bio: Mapped[str | None] = mapped_column(Text, deferred=True)
    posts: Mapped[list["Post"]] = relationship(
        back_populates="author", lazy="select", cascade="all, delete-orphan"
    )


class Post(Base):
    __tablename__ = "satp_post"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(ForeignKey("satp_user.id"))
    author: Mapped[User] = relationship(back_populates="posts")
