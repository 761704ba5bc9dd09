"""What must never reach a log line, whichever process writes it."""
import logging

from ipc.logsetup import RedactingFilter, redact
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
    import sys

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
