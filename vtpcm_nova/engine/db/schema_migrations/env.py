"""Alembic environment: runs revisions on the connection ``migration``
hands over (``config.attributes["connection"]``), or on
``sqlalchemy.url`` for a developer running ``alembic`` by hand."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection, make_url

from vtpcm_nova.engine.db import models, schema

config = context.config


def run(conn: Connection) -> None:
    # SQLite cannot ALTER most things: revisions change its tables by copy
    context.configure(connection=conn, target_metadata=models.Base.metadata,
                      render_as_batch=conn.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the engine's revisions run online only (vtpcm-manage db sync)")
given = config.attributes.get("connection")
if given is not None:
    run(given)
else:
    engine = schema.connect(make_url(config.get_main_option("sqlalchemy.url") or ""))
    try:
        with engine.begin() as connection:
            run(connection)
    finally:
        engine.dispose()
