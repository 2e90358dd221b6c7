"""When to try a failed job again: exponential backoff with full jitter."""

from __future__ import annotations

import random
from datetime import datetime, timedelta


def next_attempt_at(
    now: datetime, attempts: int, base_seconds: float, max_seconds: float
) -> datetime:
    """A random moment in [0, min(max, base * 2**(attempts-1))] from now.

    Full jitter spreads the retries of many jobs that failed together (a PACS
    restart), so they do not return in lockstep.
    """
    ceiling = min(max_seconds, base_seconds * 2 ** max(0, attempts - 1))
    return now + timedelta(seconds=random.uniform(0.0, ceiling))
