"""Alembic migrations of Parley's database: `env.py` (async, `render_as_batch=True` for SQLite)
and one revision per schema change under `versions/`. `storage.db` runs them at start-up and for
`parley db upgrade`; the `alembic` command line works too."""
