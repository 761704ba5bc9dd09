"""Which worker owes which preview: the supervisor's rules for the `previews_owed` list.

A worker says `preview_owed {path}` when a verified file's preview is queued on its sidecar
thread and `preview_settled {path}` when the path's newest file needs nothing more. The store
keeps the list across stops; this keeps, for the running daemon, who owes each path: one start
of one worker (`Owner`: its name and start time, never a pid, which a restart may get again), or
None for what the last run owed. Plain code, no store and no processes: supervisor.py stores
what `owed` / `settled` accept and sends what `hand_to` returns.
"""
from __future__ import annotations

from collections.abc import Iterable

Owner = tuple[str, float]  # (worker name, the monotonic time of that start)


class OwedPreviews:
    def __init__(self, from_last_run: Iterable[str] = ()):
        self._owner: dict[str, Owner | None] = dict.fromkeys(from_last_run)
        self.loaded = False  # whether the store's list (the last run's) has been read in

    def load(self, stored: Iterable[str]) -> None:
        """The store's list, read when the first worker is ready, or later if the store could
        not be read then: a path a worker of this run owes meanwhile keeps its owner, the rest
        are the last run's."""
        for path in stored:
            self._owner.setdefault(path, None)
        self.loaded = True

    def __len__(self) -> int:
        return len(self._owner)

    def owed(self, path: str, by: Owner) -> None:
        """A worker queued the preview of `path`: it owes it now (a newer file there wins)."""
        self._owner[path] = by

    def settled(self, path: str, by: Owner, live: set[Owner]) -> bool:
        """Whether to drop `path` from the store: not when another live worker owes it (a newer
        file at the path, whose preview it still fetches)."""
        owner = self._owner.get(path)
        if owner is not None and owner != by and owner in live:
            return False
        self._owner.pop(path, None)
        return True

    def hand_to(self, worker: Owner, live: set[Owner]) -> tuple[list[str], int]:
        """For a worker that is ready: every path no live worker owes (the last run's, and what
        a worker that has died owed), now owed by `worker`; and how many were the last run's."""
        orphans = [path for path, owner in self._owner.items() if owner not in live]  # None is never live
        last_run = sum(1 for path in orphans if self._owner[path] is None)
        for path in orphans:
            self._owner[path] = worker
        return orphans, last_run
