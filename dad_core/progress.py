"""Progress of long work: a bar on a terminal, periodic log lines where there is none (pipeline pods, CI logs).

A bar redrawn in place is noise in a pod's log, and no bar at all leaves a training job silent until it ends, so
with ``enabled=False`` the same counter is written as a log line every :data:`LOG_EVERY_S` seconds (and once at
the start and the end): step, percentage, rate, ETA and the loss the loop reports.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOG_EVERY_S", "progress_bar"]

LOG_EVERY_S = 30.0
_LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, ETA {remaining}{postfix}"
_LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} done, {rate_fmt}, elapsed {elapsed}{postfix}"


class _LogLines(io.TextIOBase):
    """A file for tqdm that turns each redraw into one log line."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            self._logger.info(line)
        return len(text)

    def flush(self) -> None:
        pass


def progress_bar(
    iterable: Any = None,
    *,
    desc: str,
    enabled: bool,
    primary: bool = True,
    logger: logging.Logger | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar when ``enabled``, else a tqdm writing a log line every :data:`LOG_EVERY_S` s; silent when not
    ``primary`` (the other ranks). ``kwargs`` go to tqdm (``total``, ``initial``, ``unit``, ...).

    Update the postfix with ``set_postfix(..., refresh=False)``: a refresh would write a log line each time.
    """
    if not primary:
        return tqdm(iterable, desc=desc, disable=True, **kwargs)
    if enabled:
        return tqdm(iterable, desc=desc, **kwargs)
    has_total = kwargs.get("total") is not None or hasattr(iterable, "__len__")
    return tqdm(
        iterable,
        desc=desc,
        file=_LogLines(logger or logging.getLogger("dad_core.progress")),
        mininterval=LOG_EVERY_S,
        maxinterval=LOG_EVERY_S * 4,
        bar_format=_LOG_FORMAT if has_total else _LOG_FORMAT_NO_TOTAL,
        dynamic_ncols=False,
        **kwargs,
    )
