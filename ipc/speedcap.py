"""The supervisor's side of the speed cap: which rate is in force (an API override, else the
schedule's window, else max_speed), written where every connection of every worker reads it
(ipc/ratelimit.SharedRateLimit), said when it changes, and when to look again (the schedule's
next boundary). The arithmetic is ipc/ratelimit's; this holds the state.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ipc.ratelimit import SharedRateLimit, effective_rate, local_minute, next_boundary_s

if TYPE_CHECKING:
    from supervisor import Supervisor

log = logging.getLogger("supervisor")

RECHECK_S = 3600.0  # without a schedule boundary sooner, the cap is looked at again this often


class SpeedCap:
    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.rate_limit = SharedRateLimit(sup.cfg.locks_dir / "speed.rate")
        self.override: int | None = sup.store.get_kv("speed.override")
        self.in_force: tuple[int, str] | None = None
        self.next_check = 0.0

    def next_due(self) -> float:
        return self.next_check

    def apply(self) -> tuple[int, str]:
        """Write the cap in force where every connection reads it, and say so when it changes."""
        sup, cfg = self.sup, self.sup.cfg
        minute, second = local_minute()
        rate, source = effective_rate(cfg.max_speed, cfg.speed_schedule, self.override, minute)
        boundary = next_boundary_s(cfg.speed_schedule, minute, second)
        self.next_check = sup.clock() + (min(boundary, RECHECK_S) if boundary is not None else RECHECK_S)
        if (rate, source) != self.in_force:
            first = self.in_force is None
            self.in_force = (rate, source)
            try:
                self.rate_limit.set_rate(rate)
            except OSError as exc:
                log.error("could not set the speed cap (%s); downloads go uncapped", exc)
            last = sup.store.get_kv("speed.in_force")
            if not first or last != [rate, source]:
                log.info("speed cap: %s (%s)", f"{rate / 1e6:.2f} MB/s" if rate else "none", source)
                sup.remember("speed.in_force", [rate, source])
                sup.emit_now("speed_limit_changed", max_speed=rate or None, source=source)
        return rate, source

    def view(self) -> dict:
        rate, source = self.in_force or self.apply()
        cfg = self.sup.cfg
        return {"max_speed": rate or None, "source": source, "config": cfg.max_speed, "override": self.override,
                "schedule": [{"from": f"{a // 60:02d}:{a % 60:02d}", "to": f"{b // 60:02d}:{b % 60:02d}",
                              "max_speed": bps} for a, b, bps in cfg.speed_schedule]}

    def set_override(self, max_speed: int | None) -> dict:
        with self.sup.txn():
            self.sup.store.set_kv("speed.override", max_speed)
        self.override = max_speed
        self.apply()
        return self.view()
