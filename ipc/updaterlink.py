"""The supervisor's side of the updater process: the entries it checks, the clock it reports
(shown by /api/status), and the updates it finds, recorded per manifest_mode and queued.

The updater never opens SQLite (forked while the supervisor's threads use it, an inherited
mutex could be held): everything it needs comes over its Pipe from here.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ipc.manifest import entry_to_job_spec
from ipc.messages import Msg

if TYPE_CHECKING:
    from supervisor import Supervisor

log = logging.getLogger("supervisor")

UPDATER_SEND_S = 2.0  # the updater's copy of the entries is brought up to date at most this often
INFO_KEYS = ("last_check", "last_success", "next_check")


class UpdaterLink:
    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.info: dict = {"last_check": None, "last_success": None, "next_check": None, "running": False}
        self._sent_entries: list | None = None
        self._next_send = 0.0

    def load(self) -> None:
        for key in INFO_KEYS:
            self.info[key] = self.sup.store.get_kv(f"updater.{key}")

    def next_due(self) -> float | None:
        """When the updater's copy of the entries is to be brought up to date, if it is behind."""
        return None if self.sup.keeper.entries is self._sent_entries else self._next_send

    def on_ready(self, child) -> None:
        self.info["running"] = False  # a check cut short by its death is over
        # It gets the last check's time from here, with the entries (it has no database).
        child.send({"type": Msg.MANIFEST, "entries": self.sup.keeper.entries,
                    "last_success_ts": self.sup.store.get_kv("updater.last_success_ts")})
        self._sent_entries = self.sup.keeper.entries

    def send_entries(self, force: bool = False) -> None:
        """The updater's copy of the entries, at most every UPDATER_SEND_S (under a stream of
        downloads they change every tick) unless `force`."""
        sup = self.sup
        if sup.keeper.entries is self._sent_entries or not force and sup.clock() < self._next_send:
            return
        updater = sup.pool.get("updater")
        if updater is not None and updater.ready and updater.send({"type": Msg.MANIFEST,
                                                                   "entries": sup.keeper.entries}):
            self._sent_entries = sup.keeper.entries
            self._next_send = sup.clock() + UPDATER_SEND_S

    def on_message(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == Msg.CHECK_STARTED:
            self.info["running"] = True
        elif kind == Msg.SCHEDULE:
            self.info["next_check"] = msg.get("next_check")
            self.sup.remember("updater.next_check", msg.get("next_check"))
        elif kind == Msg.CHECK_DONE:
            self.info["running"] = False
            self.info["last_check"] = msg.get("ts")
            self.sup.remember("updater.last_check", msg.get("ts"))
            if msg.get("ok"):
                self.info["last_success"] = msg.get("ts")
                self.sup.remember("updater.last_success", msg.get("ts"))
                self.sup.remember("updater.last_success_ts", msg.get("unix_ts"))
            log.log(logging.INFO if msg.get("ok") else logging.WARNING,
                    "update check %s: %s model(s), %s update(s), %s error(s), %s request(s) in %.1f s%s",
                    "done" if msg.get("ok") else "failed", msg.get("models"), msg.get("updates"),
                    msg.get("errors"), msg.get("requests"), float(msg.get("duration_s") or 0),
                    f"; {msg['error']}" if msg.get("error") else "")
        elif kind == Msg.UPDATE_FOUND:
            self.sup.apply("update", msg)  # stored with the tick's other messages
        elif kind == Msg.UPDATE_ERROR:
            log.warning("update check for model %s failed: %s", msg.get("model_id"), msg.get("error"))
            self.sup.emit_now("model_update_error", model_id=msg.get("model_id"), error=msg.get("error"))

    def apply_update(self, msg: dict) -> None:
        """A newer version (or a file replaced in place): recorded per manifest_mode, queued."""
        sup = self.sup
        update = {"model_id": msg["model_id"], "previous_version_id": msg.get("previous_version_id"),
                  "previous_file_id": msg.get("previous_file_id"), "entry": msg["entry"]}
        if sup.keeper.records(msg["model_id"], msg["entry"]):
            # Found against an older copy of the entries (they reach the updater at most every
            # UPDATER_SEND_S): already recorded and announced.
            log.debug("model %s: version %s already recorded", msg["model_id"], msg["entry"].get("modelVersionId"))
            return
        with sup.txn():
            entry = sup.keeper.apply({"op": "update", "update": update, "mode": sup.cfg.manifest_mode})
            if entry is None:
                return  # the entry left the manifest while the check ran
            new = msg["entry"]
            log.info("model %s: new version %s (was %s), file %s", msg["model_id"], new.get("modelVersionId"),
                     msg.get("previous_version_id"), new.get("filename"))
            sup.emit("model_update", model_id=msg["model_id"], version_id=new.get("modelVersionId"),
                     previous_version_id=msg.get("previous_version_id"), sha256=new.get("sha256"),
                     updatedAt=new.get("updatedAt"), filename=new.get("filename"), file_id=new.get("fileId"))
            sup.note(sup.ledger.queue(entry_to_job_spec(entry), source="update", requeue_finished=True))
