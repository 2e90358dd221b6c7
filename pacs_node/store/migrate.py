"""Schema migrations: Alembic, configured in code (no alembic.ini needed at run time)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

# The migration scripts live in the pacs_node.migrations package folder.
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Any fixed number: processes starting together on PostgreSQL migrate one at a time.
_MIGRATION_LOCK_KEY = 0x7061_6373


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for our scripts; env.py runs on `connection` when given."""
    config = Config()
    # Config values are %-interpolated; a path is not.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision` in one transaction."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        command.upgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision among our scripts."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
