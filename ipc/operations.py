"""What the web process (and the command line, through it) may ask the supervisor: one method per
control operation, run on the supervisor's main loop. They call the ledger and the manifest
keeper; none of them touches a process or a socket except through the supervisor it is given."""
from __future__ import annotations

import logging
import time
from typing import Any

from ipc import VERSION
from ipc.control import ControlError
from ipc.ledger import LedgerError
from ipc.manifest import ManifestError, entry_file_key, validate_entry
from ipc.states import ChildState
from ipc.store import StoreUnavailable, public_job

log = logging.getLogger("supervisor")


class ControlOps:
    def __init__(self, sup: Any):
        self.sup = sup  # the Supervisor (duck-typed: ipc/ never imports supervisor.py)

    def handle(self, op: str, args: dict):
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ControlError(400, f"unknown operation {op!r}")
        try:
            return handler(**args)
        except LedgerError as exc:
            raise ControlError(exc.status, str(exc)) from None
        except StoreUnavailable as exc:
            raise ControlError(503, f"the job database is busy ({exc}); try again shortly") from None
        except TypeError as exc:
            raise ControlError(400, f"bad arguments for {op}: {exc}") from None

    # --- reading ------------------------------------------------------------------------------

    def op_health(self) -> dict:
        sup = self.sup
        degraded = sup.degraded_reason()
        return {"status": "degraded" if degraded else "ok", "reason": degraded, "stopping": sup.stopping,
                "paused": sup.ledger.paused_all}

    def op_status(self) -> dict:
        sup = self.sup
        degraded = sup.degraded_reason()
        return {
            "version": VERSION, "started_at": sup.started_iso, "uptime_s": round(time.time() - sup.started_wall, 1),
            "children": [c.public() for c in sup.pool], "queue": sup.store.job_counts(),
            "updater": dict(sup.updates.info), "stopping": sup.stopping, "paused": sup.ledger.paused_all,
            "manifest_error": sup.keeper.error, "manifest_pending": sup.keeper.pending_count, "health": "degraded" if degraded else "ok", "degraded": degraded,
            "running": [public_job(j) for j in sup.ledger.running()],
        }

    def op_manifest(self) -> dict:
        return {"entries": self.sup.keeper.entries, "error": self.sup.keeper.error}

    # --- jobs ---------------------------------------------------------------------------------

    def op_add_job(self, model_id=None, version_id=None, file_id=None, priority=None, model_type=None,
                   file_type=None, format=None, fp=None) -> dict:
        if model_id is None and version_id is None:
            raise ControlError(422, "give model_id or version_id")
        spec = {"model_id": model_id, "version_id": version_id, "file_id": file_id, "model_type": model_type,
                "priority": priority or 10, "file_type": file_type, "format": format, "fp": fp}
        with self.sup.txn():
            outcome = self.sup.note(self.sup.ledger.queue(spec, source="api"))
        return {"job": public_job(outcome.job), "created": outcome.created}

    def op_set_priority(self, job_id, priority) -> dict:
        with self.sup.txn():
            outcome = self.sup.ledger.set_priority(int(job_id), int(priority))
        return {"job": public_job(outcome.job)}

    def op_cancel_job(self, job_id) -> dict:
        sup = self.sup
        with sup.txn():
            outcome = sup.note(sup.ledger.cancel(int(job_id)))
        sup.after_job_change(outcome)
        sup.tell_holder(outcome.job["id"], "cancel")
        log.info("job %s cancelled", job_id)
        return {"job": public_job(outcome.job)}

    def op_retry_job(self, job_id) -> dict:
        with self.sup.txn():
            outcome = self.sup.note(self.sup.ledger.retry(int(job_id)))
        return {"job": public_job(outcome.job)}

    def op_pause_job(self, job_id) -> dict:
        sup = self.sup
        with sup.txn():
            outcome = sup.note(sup.ledger.pause(int(job_id), bytes_done=sup.latest_bytes(int(job_id))))
        sup.tell_holder(outcome.job["id"], "pause")
        return {"job": public_job(outcome.job)}

    def op_resume_job(self, job_id) -> dict:
        with self.sup.txn():
            outcome = self.sup.note(self.sup.ledger.resume(int(job_id)))
        return {"job": public_job(outcome.job)}

    def op_pause(self) -> dict:
        sup = self.sup
        with sup.txn():
            sup.note(sup.ledger.set_paused_all(True))
        for job in list(sup.ledger.running()):
            sup.tell_holder(job["id"], "pause")
        log.info("all downloads paused")
        return {"paused": True}

    def op_resume(self) -> dict:
        with self.sup.txn():
            self.sup.note(self.sup.ledger.set_paused_all(False))
        log.info("downloads resumed")
        return {"paused": False}

    # --- the manifest ---------------------------------------------------------------------------

    def op_add_manifest_entry(self, entry) -> dict:
        sup = self.sup
        try:
            validate_entry(entry, "entry")
        except ManifestError as exc:
            raise ControlError(422, str(exc)) from None
        if sup.keeper.error is not None:
            raise ControlError(409, f"manifest.json has an invalid edit; fix it first: {sup.keeper.error}")
        key = entry_file_key(entry)
        if any(entry_file_key(e) == key for e in sup.keeper.entries):
            raise ControlError(409, f"manifest.json already has an entry for this file of model {entry['modelId']}")
        with sup.txn():
            sup.keeper.apply({"op": "add", "entry": entry})
            sup.sync_manifest("api")
        spec = {"model_id": entry["modelId"], "version_id": entry.get("modelVersionId"), "file_id": entry.get("fileId"),
                "model_type": entry["model_type"], **{k: entry.get(k) for k in ("file_type", "format", "fp")}}
        job = sup.ledger.find_active(spec)
        return {"entry": entry, "job": public_job(job) if job else None}

    def op_delete_manifest_model(self, model_id) -> dict:
        sup = self.sup
        model_id = int(model_id)
        removed = sum(1 for e in sup.keeper.entries if e["modelId"] == model_id)
        if not removed:
            raise ControlError(404, f"manifest.json has no entry for model {model_id}")
        with sup.txn():
            sup.keeper.apply({"op": "remove_model", "model_id": model_id})
        return {"removed": removed}

    def op_delete_manifest_entry(self, model_id, file_id) -> dict:
        sup = self.sup
        model_id, file_id = int(model_id), int(file_id)
        removed = sum(1 for e in sup.keeper.entries if e["modelId"] == model_id and e.get("fileId") == file_id)
        if not removed:
            raise ControlError(404, f"manifest.json has no entry for file {file_id} of model {model_id}")
        with sup.txn():
            sup.keeper.apply({"op": "remove_entry", "model_id": model_id, "file_id": file_id})
        return {"removed": removed}

    # --- the library --------------------------------------------------------------------------

    def op_library_scan(self, folder=None, dry_run=False) -> dict:
        from ipc.library import LibraryError, scan_folder

        sup = self.sup
        if sup.scans.running:
            raise ControlError(409, "a library scan is running already; GET /api/library/scan follows it")
        if sup.keeper.error is not None:
            raise ControlError(409, f"manifest.json has an invalid edit; fix it first: {sup.keeper.error}")
        try:
            rel = scan_folder(sup.cfg.download_path, folder)
        except LibraryError as exc:
            raise ControlError(404 if "there is no folder" in str(exc) else 422, str(exc)) from None
        return {"scan": sup.scans.start(rel, bool(dry_run))}

    def op_library_scan_status(self) -> dict:
        return {"scan": self.sup.scans.scan}

    # --- the speed cap ---------------------------------------------------------------------------

    def op_speed(self) -> dict:
        return self.sup.speed.view()

    def op_set_speed(self, max_speed=None) -> dict:
        if max_speed is not None and not (isinstance(max_speed, int) and not isinstance(max_speed, bool)
                                          and 0 <= max_speed <= 10**12):
            raise ControlError(422, "'max_speed' must be bytes per second (0: no cap) or null to clear the override")
        return self.sup.speed.set_override(max_speed)

    # --- the updater ------------------------------------------------------------------------------

    def op_check_updates(self) -> dict:
        updater = self.sup.pool.get("updater")
        self.sup.updates.send_entries(force=True)  # a check asked for now sees the entries of now
        if updater is None or updater.state != ChildState.RUNNING or not updater.send({"type": "check_now"}):
            state = updater.state if updater is not None else "missing"
            raise ControlError(503, f"the updater is {state}; try again shortly")
        return {"started": True}
