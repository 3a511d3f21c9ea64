"""The schema: one SQLAlchemy `metadata` holding every millrace table.

Importing the package loads every table module, so `metadata` is complete
wherever it is read (Alembic, `db upgrade`, tests).
"""

from millrace.cloud.schema import ops as _ops  # noqa: F401  (registers the ops tables)
from millrace.cloud.schema import packed as _packed  # noqa: F401  (the packed readings)
from millrace.cloud.schema import pending as _pending  # noqa: F401  (rollup partials)
from millrace.cloud.schema.core import HypertableSpec, metadata

__all__ = ["HypertableSpec", "metadata"]
