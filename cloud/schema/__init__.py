"""The schema: one SQLAlchemy `metadata` holding every millrace table."""

from cloud.schema.core import HypertableSpec, metadata

__all__ = ["HypertableSpec", "metadata"]
