"""Errors raised by the label store.

Each subclasses the stdlib error a caller would already catch (``ValueError`` for a
store that does not match what the caller asked for, ``FileNotFoundError`` for one that
is not there, ``KeyError`` for a view that is not in it) and says how to fix the problem
where a fix is known.
"""

from __future__ import annotations


class StoreNotFoundError(FileNotFoundError):
    """No label store at the given URL (no group metadata, or not written by label_store)."""


class SchemaVersionError(ValueError):
    """The store was written with a schema version this reader does not understand."""


class StoreMismatchError(ValueError):
    """`create_store` found an existing store with another fingerprint or target set."""


class FingerprintMismatchError(ValueError):
    """`open_store` found a teacher fingerprint other than the one the caller expects."""


class PartExistsError(FileExistsError):
    """A part with this id is already committed (a retried task that already succeeded)."""


class PartStateError(RuntimeError):
    """A `PartWriter` was used after `commit()` or `abort()`."""


class ViewNotFoundError(KeyError):
    """The requested ``(image_id, view_id)`` is not a committed view of the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the sentence as written
        return str(self.args[0]) if self.args else ""


class CorruptDataError(ValueError):
    """Stored bytes failed a check (crc32c, decompression, size, view checksum)."""


class StoreFormatError(ValueError):
    """An array or manifest file is not laid out the way this version writes it."""
