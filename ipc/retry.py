"""Every backoff of the daemon as one object: how long to wait before try number `n`."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """`delay(n)` for the n-th retry (n >= 1): base_s * factor**(n-1), at most cap_s, stretched by
    up to `jitter` (a fraction) so that many waiters don't come back in lockstep. A server's
    Retry-After wins when it is longer. `max_tries` is what the caller gives up after (0: never)."""

    base_s: float
    factor: float = 2.0
    cap_s: float = 60.0
    jitter: float = 0.0
    max_tries: int = 0

    def delay(self, n: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        raw = min(self.cap_s, self.base_s * self.factor ** max(0, n - 1))
        if self.jitter:
            raw *= 1 + self.jitter * (rng or random).random()
        if retry_after_s is not None and retry_after_s > raw:
            return float(retry_after_s)
        return raw

    def gives_up(self, tries: int) -> bool:
        return bool(self.max_tries) and tries >= self.max_tries


# A failed download attempt (the job's own `retries` count is max_tries).
JOB_RETRY = RetryPolicy(base_s=2.0, factor=2.0, cap_s=300.0, jitter=0.2)
# A child that dies soon after its start or on the same job again (SPEC §5: 1 s doubling to 60 s).
CHILD_RESTART = RetryPolicy(base_s=1.0, factor=2.0, cap_s=60.0)
# The database busy or the disk full: try the write again soon, then less often.
STORE_RETRY = RetryPolicy(base_s=0.1, factor=2.0, cap_s=5.0)
# Civitai's daily download quota: an hour at least, growing if it keeps saying so.
QUOTA_WAIT = RetryPolicy(base_s=3600.0, factor=2.0, cap_s=6 * 3600.0, jitter=0.05)
# A file Civitai has not hashed yet: look again, for up to a day.
UNHASHED_WAIT = RetryPolicy(base_s=600.0, factor=1.5, cap_s=3600.0, jitter=0.1)
UNHASHED_GIVE_UP_S = 24 * 3600.0
# A webhook delivery (SPEC §7: 3 tries).
WEBHOOK_RETRY = RetryPolicy(base_s=1.0, factor=4.0, cap_s=4.0, max_tries=3)
