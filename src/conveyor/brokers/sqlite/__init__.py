"""The embedded SQLite broker (the default): ``sqlite:///relative.db`` or ``sqlite:////abs.db``.

Layout: :mod:`.broker` (the async broker), :mod:`.transitions` (each transition as one
transaction), :mod:`.connection` (the database thread and the schema), :mod:`.queries` with
``queries.sql`` and ``schema.sql`` (all SQL), :mod:`.rows` (row decoding), :mod:`.options` (URL
and settings), :mod:`.translate` (``sqlite3`` errors to conveyor errors).
"""

from conveyor.brokers.sqlite.broker import SQLiteBroker
from conveyor.brokers.sqlite.options import SQLiteOptions

__all__ = ["SQLiteBroker", "SQLiteOptions"]
