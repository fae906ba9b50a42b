"""Alembic environment and revisions of the engine database (see
``vtpcm_nova.engine.db.migration``; how to add one: doc/source/contributor)."""
