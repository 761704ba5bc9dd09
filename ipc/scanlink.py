"""The supervisor's side of a library scan (`import` through the daemon): a one-shot `library`
child hashes and identifies; what it learns is stored here and its entries are added, so the
supervisor stays the only writer of manifest.json."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ipc.children import Exit, ForkedChild
from ipc.logsetup import child_log_handler
from ipc.states import ChildKind
from ipc.store import utc_now_iso

if TYPE_CHECKING:
    from supervisor import Supervisor

log = logging.getLogger("supervisor")


class LibraryScans:
    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.scan: dict | None = None  # the running or last scan (GET /api/library/scan)
        self._request: dict | None = None  # what the library child gets once it is ready
        self._started = 0.0
        self._base: list | None = None  # the manifest's entries the scan planned against

    @property
    def running(self) -> bool:
        return self.scan is not None and self.scan.get("state") == "running"

    def start(self, folder: str | None, dry_run: bool) -> dict:
        from ipc.library import load_answers, new_scan
        from workers.library import library_main

        sup = self.sup
        self.scan = new_scan(folder, dry_run)
        self._started = sup.clock()
        self._base = sup.keeper.entries
        self._request = {"folder": folder, "dry_run": dry_run, "entries": sup.keeper.entries,
                         "files": sup.store.all_files(), "answers": load_answers(sup.store)}
        if sup.pool.get("library") is not None:
            del sup.pool.children["library"]
        log_handler_for = (lambda child: child_log_handler(child.name)) if sup.fork else (lambda child: sup.log_queue)
        child = sup.pool.add(ForkedChild("library", ChildKind.LIBRARY, library_main,
                                         lambda child: (str(sup.cfg.config_path),), sup.ctx, log_handler_for,
                                         sup.supervisor_fds, on_change=sup.on_child_change, oneshot=True))
        child.spawn(sup.clock())
        log.info("library scan of %s%s started", folder or "download_dir", " (dry run)" if dry_run else "")
        sup.emit_now("library_scan_started", folder=folder)
        return self.scan

    def on_ready(self, child) -> None:
        if self._request is not None:
            child.send({"type": "scan", "request": self._request})
            self._request = None

    def on_message(self, msg: dict) -> None:
        kind = msg.get("type")
        sup = self.sup
        if kind == "library_progress" and self.scan is not None:
            self.scan.update(msg["scan"])
            if sup.control:  # a view: published, never stored (at most 4 a second)
                s = self.scan
                sup.control.publish({"event": "library_scan_progress", "ts": utc_now_iso(),
                                     "files_done": s["files_done"], "files_total": s["files_total"],
                                     "bytes_done": s["bytes_done"], "bytes_total": s["bytes_total"]})
        elif kind == "library_hashes":
            sup.apply("library_hashes", msg["files"])
        elif kind == "library_answers":
            sup.apply("library_answers", msg["answers"])
        elif kind == "library_done":
            sup.apply("library_done", msg)

    def store_hashes(self, files: list) -> None:
        with self.sup.txn():
            for rel, sha, size, mtime_ns in files:
                self.sup.store.record_file(rel, sha, int(size), int(mtime_ns))

    def store_answers(self, answers) -> None:
        from ipc.library import save_answers

        with self.sup.txn():
            save_answers(self.sup.store, answers)

    def done(self, msg: dict) -> None:
        from ipc.library import load_answers
        from workers.library import plan_import

        sup = self.sup
        scan = dict(msg["scan"])
        entries = msg.get("entries") or []
        with sup.txn():
            if scan["state"] == "done" and not scan.get("dry_run"):
                if sup.keeper.entries is not self._base:
                    # The manifest changed during the scan (a person's save, a download): plan again.
                    plan = plan_import([tuple(p) for p in msg.get("found") or []], load_answers(sup.store),
                                       sup.keeper.entries)
                    entries = plan.entries
                for entry in entries:
                    sup.keeper.apply({"op": "add", "entry": entry})
                sup.sync_manifest("import")
            sup.emit("library_scan_done", folder=scan.get("folder"), files=scan.get("files_total"),
                     matched=scan.get("matched"), added=scan.get("added"), already_listed=scan.get("already_listed"),
                     unknown=scan.get("unknown"), seconds=scan.get("seconds"), state=scan.get("state"),
                     error=scan.get("error"))
        self.scan = scan
        log.log(logging.INFO if scan["state"] == "done" else logging.WARNING,
                "library scan %s: %s file(s), %s matched, %s added, %s already listed, %s unknown%s",
                scan["state"], scan.get("files_total"), scan.get("matched"), scan.get("added"),
                scan.get("already_listed"), len(scan.get("unknown") or []),
                f"; {scan['error']}" if scan.get("error") else "")

    def child_gone(self, ex: Exit) -> None:
        sup = self.sup
        if self.running and not sup.deferred:
            assert self.scan is not None
            self.scan.update(state="failed", error=f"the library scan stopped: its process ended "
                                                   f"(exit code {ex.code}); run it again to finish it")
            sup.emit_now("library_scan_done", folder=self.scan.get("folder"), state="failed",
                         error=self.scan["error"], files=self.scan.get("files_total"), matched=0, added=0,
                         already_listed=0, unknown=[], seconds=round(sup.clock() - self._started, 1))
