"""The control-plane store: SQLAlchemy 2 async models, Alembic migrations, a scoped repository.

See :mod:`qmachina.store.database` for engines and migrations from a URL and
:mod:`qmachina.store.repository` for the workspace-scoped reads and writes.
"""
