"""/metrics: the daemon's numbers in the Prometheus text exposition format (0.0.4)."""
from __future__ import annotations

from ipc.states import JobState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Counters the supervisor keeps in the job store's kv table: they only grow, whatever is pruned.
DOWNLOADED_BYTES_KEY = "metrics.downloaded_bytes"
WORKER_RESTARTS_KEY = "metrics.worker_restarts"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _kv_count(store, key: str) -> int:
    """A counter from the kv table; one that is missing or garbled reads as 0 rather than break
    the whole scrape."""
    try:
        return max(0, int(store.get_kv(key, 0) or 0))
    except (TypeError, ValueError):
        return 0


def render(store, status: dict | None, hub) -> str:
    """`status` is the supervisor's answer to the "status" op, or None when it is unreachable."""
    out = _Writer()
    counts = store.job_counts()
    out.metric("civitai_jobs", "gauge", "Jobs in the store by state.",
               [({"state": s.value}, counts.get(s.value, 0)) for s in JobState])
    out.metric("civitai_queue_length", "gauge", "Jobs waiting to be downloaded.",
               [({}, counts.get(JobState.QUEUED.value, 0))])
    # Not the sum of the done jobs: that sum shrinks when old jobs are pruned, and a counter must not.
    out.metric("civitai_downloaded_bytes_total", "counter", "Bytes of model files downloaded and verified.",
               [({}, _kv_count(store, DOWNLOADED_BYTES_KEY))])
    failures = store.failure_counts()
    out.metric("civitai_download_failures", "gauge", "Failed jobs by reason.",
               [({"reason": reason}, n) for reason, n in sorted(failures.items())])
    out.metric("civitai_worker_restarts_total", "counter", "Worker processes restarted after a crash or timeout.",
               [({}, _kv_count(store, WORKER_RESTARTS_KEY))])
    last_check = store.get_kv("updater.last_success_ts")
    if last_check is not None:
        out.metric("civitai_last_update_check_timestamp_seconds", "gauge",
                   "Unix time of the last successful update check.", [({}, float(last_check))])
    out.metric("civitai_supervisor_up", "gauge", "Whether the supervisor answered the web process.",
               [({}, status is not None)])
    if status:
        children = status.get("children") or []
        out.metric("civitai_child_running", "gauge", "Child processes, 1 when running.",
                   [({"name": c.get("name"), "kind": c.get("kind")}, c.get("state") == "running") for c in children])
        out.metric("civitai_child_restarts_total", "counter", "Restarts of each child process.",
                   [({"name": c.get("name"), "kind": c.get("kind")}, int(c.get("restarts") or 0)) for c in children])
        if status.get("uptime_s") is not None:
            out.metric("civitai_uptime_seconds", "gauge", "Seconds since the daemon started.",
                       [({}, float(status["uptime_s"]))])
    if hub is not None:
        out.metric("civitai_websocket_clients", "gauge", "Connected WebSocket clients.", [({}, len(hub.clients))])
        out.metric("civitai_websocket_dropped_total", "counter", "WebSocket clients dropped for being too slow.",
                   [({}, hub.dropped_total)])
    return out.text()
