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
