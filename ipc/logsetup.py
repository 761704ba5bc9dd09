"""Logging for every process: one rotating file (data/logs/daemon.log) and stderr.

On Linux the workers are forked and multiprocessing-logging carries their records to the
supervisor, which alone writes the file (several writers rotating one file would corrupt it);
each child gets a queue of its own (see child_log_handler).
Where there is no fork (Windows), children get a multiprocessing queue and a QueueHandler, and
the supervisor runs a QueueListener. The web process is a fresh interpreter: it logs to stderr
and the supervisor relays those lines. Under systemd, the supervisor's stderr lines carry the
record's syslog priority (`<3>` …) for the journal.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
from pathlib import Path

from multiprocessing_logging import MultiProcessingHandler

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"
MAX_LOG_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5

_QUERY_RE = re.compile(r"(https?://[^\s?#\"']+)\?[^\s\"']*")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")
# token=… in a query string or a login link's fragment (#token=…), and the like.
_TOKEN_PARAM_RE = re.compile(r"(?i)\b((?:access_)?token|jwt|authorization)=[^&\s\"]*")


def redact(text: str) -> str:
    """Remove what must never reach a log: URL query strings (signed CDN URLs), bearer tokens,
    anything shaped like a JWT, token=… parameters. Used by every process's log path."""
    text = _QUERY_RE.sub(r"\1?…", text)
    text = _BEARER_RE.sub(r"\1***", text)
    return _TOKEN_PARAM_RE.sub(r"\1=***", _JWT_RE.sub("***", text))


class RedactingFilter(logging.Filter):
    """A last line of defence; code should not log secrets in the first place."""

    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s and len(s) >= 8)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted_by", None) is self:
            return True  # the file handler's pass already cleaned it; the stderr handler's is free
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact(message)
        for secret in self.secrets:
            clean = clean.replace(secret, "***")
        if clean != message:
            record.msg, record.args = clean, None
        record._redacted_by = self
        return True


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that learns once per opened file whether it is a regular file (the
    stock one stats the path twice for every record, bpo-45401), and otherwise rotates the same."""

    def _open(self):
        stream = super()._open()
        self._regular = os.path.isfile(self.baseFilename)
        return stream

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.stream is None:
            self.stream = self._open()
        if self.maxBytes <= 0 or not self._regular:  # _open() just above or at the last (re)open set it
            return False
        msg = f"{self.format(record)}\n"
        self.stream.seek(0, 2)
        return self.stream.tell() + len(msg) >= self.maxBytes


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3): 2 crit, 3 err, 4 warning, 6 info, 7 debug)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(stream=None, environ=None) -> bool:
    """Whether `stream` (stderr) is the journal's own stream: systemd sets JOURNAL_STREAM to its
    "device:inode" (systemd.exec(5)). Compared, not just present: a shell started from a
    systemd unit inherits the variable with its stderr on a terminal or a file."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def journal_prefix(levelno: int, stream=None) -> str:
    """What starts a line printed, not logged, on stderr: `<N>` when stderr is the journal."""
    return f"<{journal_priority(levelno)}>" if stderr_is_journal(stream) else ""


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback has many) starts with the record's priority `<N>`:
    journald reads each line as an entry of its own, and a line without a prefix as info."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup_supervisor_logging(log_path: Path, secrets: tuple[str, ...] = (), level=logging.INFO) -> None:
    """Root logger of the main process: file + stderr, secrets filtered on every handler."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT)
    redactor = RedactingFilter(secrets)
    file_handler = LogFileHandler(
        log_path, maxBytes=MAX_LOG_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )
    file_handler.setFormatter(formatter)
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(JournalFormatter(FORMAT) if stderr_is_journal(sys.stderr) else formatter)
    for handler in (file_handler, stream_handler):
        handler.addFilter(redactor)
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


class _ToRootHandlers(logging.Handler):
    """Hands a record from a child to the supervisor's own handlers (file and stderr)."""

    def __init__(self, handlers: list[logging.Handler]):
        super().__init__()
        self.targets = list(handlers)

    def emit(self, record: logging.LogRecord) -> None:
        for handler in self.targets:
            if record.levelno >= handler.level:
                handler.handle(record)


CLOSE_DRAIN_S = 0.1  # after close(): the records still in the pipe are written, then the thread ends


class BlockingReceiveHandler(MultiProcessingHandler):
    """multiprocessing-logging's handler with a receive thread that sleeps until a record or
    close() comes. The library's polls its queue five times a second to notice close(): 24
    wake-ups a second, measured, for an idle daemon with four workers."""

    _is_closed: bool  # the library's

    def __init__(self, name, sub_handler=None):
        # Before the library's __init__, which starts the thread.
        self._closing_r, self._closing_w = multiprocessing.Pipe(duplex=False)
        super().__init__(name, sub_handler=sub_handler)

    def _receive(self):
        reader = self.queue._reader  # the read end that queue.get() polls
        try:
            while True:
                ready = multiprocessing.connection.wait([reader, self._closing_r],
                                                        CLOSE_DRAIN_S if self._is_closed else None)
                if reader in ready:
                    self.sub_handler.emit(self.queue.get())
                elif self._closing_r in ready:
                    self._closing_r.recv_bytes()  # close(): write what is left, then end
                elif self._is_closed:
                    break  # nothing more came for CLOSE_DRAIN_S after close()
        except (EOFError, OSError):
            pass  # every write end is closed: the child is gone, and its last record was read
        finally:
            self._closing_r.close()
        self.queue.close()
        self.queue.join_thread()

    def inherited_fds(self) -> list[int]:
        """What a child forked for another job must close (supervisor_fds): a sibling holding
        this queue's write end keeps EOF from the reading thread when this child dies."""
        fds = []
        for conn in (self.queue._reader, self.queue._writer, self._closing_r, self._closing_w):
            try:
                fds.append(conn.fileno())
            except OSError:
                pass  # closed already
        return fds

    def close(self):
        if self._is_closed:
            return
        self._is_closed = True
        try:
            self._closing_w.send_bytes(b"x")
        except OSError:
            pass  # the thread ended already (EOF)
        self._receive_thread.join(5.0)  # a record cut short by a SIGKILL can hold it
        self._closing_w.close()
        self.sub_handler.close()
        logging.Handler.close(self)


def child_log_handler(name: str) -> logging.Handler:
    """A multiprocessing-logging handler of one child's own, made in the supervisor just before
    that child is forked: the child logs into it, the supervisor's thread writes the records.

    One queue per child, never one for all: a queue's write lock is a semaphore shared by its
    writers, and a writer SIGKILLed while holding it would silence every other process (and
    hang their exit). With a queue each, only the dead child's own queue is left locked."""
    handler = BlockingReceiveHandler(f"log-{name}", sub_handler=_ToRootHandlers(logging.getLogger().handlers))
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def use_handler_in_child(handler: logging.Handler, secrets: tuple[str, ...] = ()) -> None:
    """In a forked child: its records go only to its own queue (the inherited file and stderr
    handlers belong to the supervisor, the log file's only writer)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.addFilter(RedactingFilter(secrets))
    root.addHandler(handler)


def setup_child_logging(log_queue, secrets: tuple[str, ...] = (), level=logging.INFO) -> None:
    """In a child: with fork, `log_queue` is the child's own multiprocessing-logging handler;
    with spawn (Windows, where a Queue has no cross-process write lock) the shared queue."""
    root = logging.getLogger()
    if isinstance(log_queue, logging.Handler):
        use_handler_in_child(log_queue, secrets)
    elif log_queue is not None:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = logging.handlers.QueueHandler(log_queue)
        handler.addFilter(RedactingFilter(secrets))
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


# --- fresh interpreters (web, webhooks): records as lines on stderr, relayed at their level ---

RELAY_PREFIX = "@log "


class RelayFormatter(logging.Formatter):
    """One stderr line per record, `@log {"l": levelno, "n": logger, "m": message}`: the
    supervisor reads it back at the record's own level (a traceback stays one record)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        elif record.exc_text:
            message = f"{message}\n{record.exc_text}"
        return RELAY_PREFIX + json.dumps({"l": record.levelno, "n": record.name, "m": message},
                                         ensure_ascii=False, separators=(",", ":"))


def setup_relayed_logging(secrets: tuple[str, ...] = (), level=logging.INFO) -> None:
    """In a fresh interpreter the supervisor started: every record goes to stderr as a relay line."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RelayFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def parse_relayed_line(line: str) -> tuple[int, str, str]:
    """(level, logger name, message) of a line from a fresh interpreter's stderr. A line that is
    not a relay record (a crash before logging was set up, a C library's warning) is a WARNING:
    it should not be there, and `journalctl -p warning` must show it."""
    if line.startswith(RELAY_PREFIX):
        try:
            data = json.loads(line[len(RELAY_PREFIX):])
            return int(data["l"]), str(data["n"]), str(data["m"])
        except (ValueError, KeyError, TypeError):
            pass
    return logging.WARNING, "", line
