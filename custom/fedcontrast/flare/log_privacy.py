"""Keep file paths and patient ids out of the error log a site streams to the server.

NVFlare writes every ERROR record of a site's job process to ``error_log.txt``, and a
provisioned site streams that file to the server (``ERRORLOG_<site>`` in the job store,
shown to the admin). Libraries log errors with whatever their exceptions say: ignite's
"Engine run is terminating due to exception: ...", MONAI's transform errors, all of which can
hold a volume's path (and a path can hold a patient's name). So, at a site:

- this package logs the details of a failure (exception text, paths, traceback) at WARNING,
  which stays in the site's own ``log.txt``, and at ERROR only ``<site>: round <r>: <kind of
  failure> (<exception type>)``, marked safe;
- :func:`redact_error_log` gives the handlers that write ``error_log.txt`` a formatter that
  keeps NVFlare's own records and the records marked safe, and replaces any other record by
  one line naming its logger (no message, no traceback).
"""

from __future__ import annotations

import copy
import logging
import os

#: ``extra`` of a log record whose message may leave the site.
SAFE = {"fedcontrast_safe": True}
#: Base name of the log file NVFlare streams to the server.
ERROR_LOG_NAME = "error_log.txt"
#: Loggers whose ERROR records are kept as they are (NVFlare's own runtime).
KEPT_LOGGERS: tuple[str, ...] = ("nvflare",)


class RedactingFormatter(logging.Formatter):
    """A formatter that withholds the text of records not known to be free of identifiers."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        """The record as ``inner`` formats it, or a stand-in naming only its logger."""
        if getattr(record, "fedcontrast_safe", False) or record.name.startswith(KEPT_LOGGERS):
            return self.inner.format(record)
        stand_in = copy.copy(record)
        stand_in.msg = f"[{record.levelname} record of {record.name} withheld: see the site's local log.txt]"
        stand_in.args = ()
        stand_in.exc_info = stand_in.exc_text = stand_in.stack_info = None
        return self.inner.format(stand_in)


def redact_error_log(logger: logging.Logger | None = None) -> int:
    """Install :class:`RedactingFormatter` on every handler of ``logger`` (default: the root)
    that writes a file named ``error_log.txt``; returns how many handlers it now covers."""
    logger = logger or logging.getLogger()
    covered = 0
    for handler in logger.handlers:
        path = getattr(handler, "baseFilename", "")
        if os.path.basename(path) != ERROR_LOG_NAME:
            continue
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
        covered += 1
    return covered
