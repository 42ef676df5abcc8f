"""Optional integrations with web frameworks; each module imports its framework lazily.

- :mod:`sqlalchemy_threadpool.integrations.asgi`: pure ASGI :class:`SessionMiddleware` (no
  framework needed: Starlette, FastAPI, Litestar, Quart, any ASGI app).
- :mod:`sqlalchemy_threadpool.integrations.fastapi`: ``async def`` dependencies.
- :mod:`sqlalchemy_threadpool.integrations.litestar`: an ``InitPlugin``.

Importing :mod:`sqlalchemy_threadpool` never imports any of these, nor any web framework.
"""
