"""Access logs without credentials: query strings are replaced before a line is written.

The endpoint reads no query parameters, so a query string is either noise or a client
putting its token where it does not belong (``?token=...``, ``?access_token=...``);
uvicorn's access log would write it verbatim. `RedactQueryFilter` rewrites the path
argument of each access record to ``/path?<redacted>``. Headers (``Authorization``) are
never logged by uvicorn or by this package.
"""

from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "<redacted>"


def redact_query(path: str) -> str:
    """``/v1/teacher?token=abc`` -> ``/v1/teacher?<redacted>``; a path without a query is unchanged."""
    head, sep, _ = path.partition("?")
    return f"{head}?{REDACTED}" if sep else path


class RedactQueryFilter(logging.Filter):
    """Replaces the query string in uvicorn access records (``'%s - "%s %s HTTP/%s" %d'``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log(logger_name: str = ACCESS_LOGGER) -> None:
    """Install `RedactQueryFilter` on the access logger (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactQueryFilter) for f in logger.filters):
        logger.addFilter(RedactQueryFilter())
