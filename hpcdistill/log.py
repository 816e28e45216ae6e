"""Rank-aware logging: one rank per group speaks, and every line says which group and rank.

Batch logs interleave the output of every rank; lines from 64 ranks repeating the same progress are
noise. Group leaders log at INFO, other ranks only WARNING and above, and each line carries the
"[g<group> r<group rank>/<group size> w<world rank>]" tag.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

_FORMAT = "%(asctime)s %(tag)s %(levelname)s %(message)s"


class _TagFilter(logging.Filter):
    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.tag = self.tag
        return True


def setup_logging(tag: str = "[setup]", speaker: bool = True) -> logging.Logger:
    """(Re)configure the "hpcdistill" logger for this rank; idempotent."""
    logger = logging.getLogger("hpcdistill")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_TagFilter(tag))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if speaker else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger("hpcdistill" + (f".{name}" if name else ""))


class Progress:
    """Progress lines for batch logs: step, loss, samples/s and ETA, one line each, no carriage returns."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()

    def line(self, step: int, samples: int, **values: float) -> str:
        elapsed = time.perf_counter() - self.t0
        done = max(step - self.start_step, 0)
        rate = samples / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else float("nan")
        fields = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        eta_s = tqdm.format_interval(eta) if eta == eta else "?"
        return (f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {fields} "
                f"samples/s {rate:.0f} elapsed {tqdm.format_interval(elapsed)} eta {eta_s}")
