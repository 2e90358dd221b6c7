"""Alembic environment: runs on the connection that `pacs_node.store.migrate` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from pacs_node.store.schema import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through pacs_node.store.migrate (or `pacs-node db upgrade`)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
