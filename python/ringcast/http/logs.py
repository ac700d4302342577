"""Logging an unexpected exception without the data it carries.

Conversation ids are never logged at INFO or above, and an exception's message may hold one
(``SessionNotFound`` names the id it did not find; a plug-in's error may quote its request).
So at ERROR a failure is logged by its type and where it was raised; the message and the
traceback go to DEBUG only, for whoever turns that on to chase the bug.
"""

from __future__ import annotations

import logging
import os
import traceback


def log_failure(log: logging.Logger, what: str, exc: BaseException) -> None:
    """Log ``exc``, an exception nobody handled while doing ``what`` (a text with no id in
    it): type and raising line at ERROR, message and traceback at DEBUG."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    log.error(
        "%s: %s%s (message and traceback at --log-level DEBUG)", what, type(exc).__name__, where
    )
    log.debug("%s: details", what, exc_info=exc)
