"""Alembic migrations of the job store schema; run them with `pacs_node.store.migrate`."""
