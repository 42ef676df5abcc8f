"""What the type-check modules share: the exact-type comparison with ``AsyncSession``."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def same_as_async_session(ours: list[T], theirs: list[T]) -> None:
    """Fails type checking unless both lists hold exactly one type (``list`` is invariant).

    Call it as ``same_as_async_session([await sess.x(...)], [await async_sess.x(...)])``; mypy
    then reports "Cannot infer value of type parameter" when the two types differ.
    """
