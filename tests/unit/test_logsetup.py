"""What must never reach a log line, whichever process writes it, and how lines reach the journal."""
import logging
import os
import sys

import pytest

from ipc.logsetup import RedactingFilter, journal_prefix, journal_priority, redact, setup_supervisor_logging
from ipc.tokens import mint_token


def test_redact_removes_tokens_signed_queries_and_bearer_headers():
    token = mint_token("s" * 40, days=1)
    line = (f"open http://127.0.0.1:8000/gui#token={token} then GET https://cdn.example/f.bin?sig=abc&exp=1 "
            f"with Authorization: Bearer {token}")
    out = redact(line)
    assert token not in out and "sig=abc" not in out
    assert "http://127.0.0.1:8000/gui" in out and "https://cdn.example/f.bin" in out


def test_filter_masks_configured_secrets_in_formatted_messages():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key is %s", ("sk-0123456789abcdef",), None)
    RedactingFilter(("sk-0123456789abcdef",)).filter(record)
    assert record.getMessage() == "key is ***"


def test_relayed_records_keep_their_level_name_and_traceback():
    from ipc.logsetup import RelayFormatter, parse_relayed_line

    formatter = RelayFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("web.error", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line
    level, name, message = parse_relayed_line(line)
    assert (level, name) == (logging.ERROR, "web.error")
    assert message.startswith("failed x\nTraceback") and "ValueError: boom" in message
    assert parse_relayed_line("Fatal Python error: Aborted") == (logging.WARNING, "", "Fatal Python error: Aborted")
    assert parse_relayed_line("@log {broken") == (logging.WARNING, "", "@log {broken")


# --- the journal's priority prefix ---------------------------------------------------------------


@pytest.fixture
def root_logger():
    """setup_supervisor_logging rebuilds the root logger and quiets urllib3: give pytest's
    back afterwards (a later test may rely on urllib3's DEBUG records)."""
    root, urllib3_log = logging.getLogger(), logging.getLogger("urllib3")
    saved, saved_level, saved_urllib3_level = list(root.handlers), root.level, urllib3_log.level
    yield root
    urllib3_log.setLevel(saved_urllib3_level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved:
        root.addHandler(handler)
    root.setLevel(saved_level)


def stderr_lines(fh) -> list[str]:
    fh.flush()
    fh.seek(0)
    return fh.read().splitlines()


def journal_stream_of(fh) -> str:
    st = os.fstat(fh.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def log_everything() -> None:
    log = logging.getLogger("supervisor")
    log.debug("not shown at INFO")
    log.info("started worker-1")
    log.warning("worker-1 exited")
    log.error("disk full")
    log.critical("stopping: %s", "fatal")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("tick failed")


def test_under_the_journal_every_stderr_line_starts_with_its_priority(tmp_path, monkeypatch, root_logger):
    # In the test body, not a fixture: pytest puts its own capture back before the call.
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(stderr))
        log_path = tmp_path / "logs" / "daemon.log"
        setup_supervisor_logging(log_path)
        log_everything()
        lines = stderr_lines(stderr)
        assert [line[:3] for line in lines[:4]] == ["<6>", "<4>", "<3>", "<2>"]
        assert lines[0].startswith("<6>") and lines[0].endswith("supervisor: started worker-1")
        traceback = lines[4:]
        assert traceback[0].endswith("tick failed") and traceback[-1].endswith("ValueError: boom")
        assert all(line.startswith("<3>") for line in traceback), traceback  # `journalctl -p err` shows it all
        # The log file keeps its format: no prefix.
        file_lines = log_path.read_text().splitlines()
        assert len(file_lines) == len(lines) and not any(line.startswith("<") for line in file_lines)
        assert [line[3:] for line in lines] == file_lines


@pytest.mark.parametrize("journal_stream", [None, "", "not:a:number", "1:2"])
def test_without_the_journal_stderr_has_no_prefix(tmp_path, monkeypatch, root_logger, journal_stream):
    """Unset, malformed, or another stream's (a shell started from a unit, its stderr a terminal)."""
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        if journal_stream is None:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        else:
            monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
        setup_supervisor_logging(tmp_path / "daemon.log")
        log_everything()
        lines = stderr_lines(stderr)
        assert lines and not any(line.startswith("<") for line in lines)
        assert lines == (tmp_path / "daemon.log").read_text().splitlines()


def test_records_from_children_get_the_prefix_too(tmp_path, monkeypatch, root_logger):
    """Worker records reach the supervisor's handlers through _ToRootHandlers."""
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(stderr))
        setup_supervisor_logging(tmp_path / "daemon.log")
        from ipc.logsetup import _ToRootHandlers

        relay = _ToRootHandlers(logging.getLogger().handlers)
        record = logging.LogRecord("worker-1", logging.WARNING, __file__, 1, "retrying", None, None)
        relay.handle(record)
        assert stderr_lines(stderr)[-1].startswith("<4>")


def test_journal_priorities():
    assert [journal_priority(n) for n in (5, logging.DEBUG, logging.INFO, 25, logging.WARNING, logging.ERROR,
                                          logging.CRITICAL, 60)] == [7, 7, 6, 6, 4, 3, 2, 2]


def test_a_printed_line_gets_the_prefix_only_under_the_journal(tmp_path, monkeypatch):
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stderr:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(stderr))
        assert journal_prefix(logging.ERROR, stderr) == "<3>"
        monkeypatch.setenv("JOURNAL_STREAM", "0:0")
        assert journal_prefix(logging.ERROR, stderr) == ""


def test_the_log_file_rotates_by_size_and_a_path_that_is_no_regular_file_never_does(tmp_path):
    from ipc.logsetup import LogFileHandler

    path = tmp_path / "daemon.log"
    handler = LogFileHandler(path, maxBytes=300, backupCount=2, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for i in range(20):
            handler.emit(logging.LogRecord("t", logging.INFO, __file__, 1, f"line {i:02d} " + "x" * 40, None, None))
    finally:
        handler.close()
    assert path.stat().st_size <= 300 and (tmp_path / "daemon.log.1").stat().st_size <= 300
    assert (tmp_path / "daemon.log.2").exists() and not (tmp_path / "daemon.log.3").exists()
    assert "line 19" in path.read_text()
    if os.name == "posix":  # a FIFO or /dev/null named as the log: written to, never renamed
        null = LogFileHandler(os.devnull, maxBytes=10, backupCount=1)
        try:
            record = logging.LogRecord("t", logging.INFO, __file__, 1, "x" * 50, None, None)
            assert null.shouldRollover(record) is False
        finally:
            null.close()


def test_a_record_is_redacted_once_for_both_handlers_and_both_get_it_clean(monkeypatch):
    from ipc import logsetup

    redactor = RedactingFilter(("sekrit-api-key-123",))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "key %s in %s", ("sekrit-api-key-123", "https://x/f?sig=1"),
                               None)
    calls = []
    monkeypatch.setattr(logsetup, "redact", lambda text: calls.append(text) or redact(text))
    assert redactor.filter(record) and redactor.filter(record)  # the file handler's pass, the stderr one's
    assert len(calls) == 1 and record.getMessage() == "key *** in https://x/f?…"
    assert RedactingFilter(("another-secret-99",)).filter(record) and len(calls) == 2  # another filter looks itself
