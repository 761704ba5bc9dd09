"""The sd_notify protocol: status datagrams to systemd's $NOTIFY_SOCKET, and the watchdog interval it asks for."""
from __future__ import annotations

import os
import socket


def _socket_address() -> str | None:
    """$NOTIFY_SOCKET as an AF_UNIX address: a path, or `@name` for the abstract namespace."""
    value = os.environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a transport we do not speak (e.g. systemd's vsock:)


def notify(*lines: str) -> bool:
    """Send `KEY=VALUE` lines (READY=1, STOPPING=1, WATCHDOG=1, STATUS=...) as one datagram.

    True when the datagram was sent; False without $NOTIFY_SOCKET, without AF_UNIX (Windows),
    or when sending failed. Never raises: a service manager that is gone must not stop the daemon.
    """
    if not lines or not hasattr(socket, "AF_UNIX"):
        return False
    address = _socket_address()
    if address is None:
        return False
    # One assignment per line; a newline inside a value would start a bogus assignment.
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(payload, address)
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """The watchdog timeout systemd set for this process (WatchdogSec=), in seconds, or None.

    None when $WATCHDOG_USEC is unset or invalid, or when $WATCHDOG_PID names another process
    (a forked child inherits the variables but is not the one systemd watches).
    Send WATCHDOG=1 at least every half of this.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000
