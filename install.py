"""Installs this checkout's daemon as a service: a systemd unit on Linux, NSSM or Task Scheduler on Windows.

Standard library only and nothing from the daemon: it runs before `uv sync` has made the environment.

    python install.py [--user] [--dry-run] [--uninstall] [--platform linux|windows]

Linux: writes <name>.service (system-wide, or a user unit with --user), enables and starts it;
--uninstall stops, disables and removes it. Windows: an NSSM service when `nssm` is on the PATH,
else a Task Scheduler task at boot; with --user, a task at the user's logon. --uninstall removes
either. --dry-run prints every file it would write and every command it would run, and changes
nothing.
"""
from __future__ import annotations

import argparse
import getpass
import json
import ntpath
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

SERVICE_NAME = "civitai-daemon"
DESCRIPTION = "Civitai download daemon"
EX_CONFIG = 78                  # the daemon's exit code for a bad config or manifest: never restart on it
DAEMON_DRAIN_S = 20             # SPEC §5: the daemon stops within 20 s of SIGTERM
STOP_TIMEOUT_S = 35             # systemd/NSSM wait this long before killing what is left
WATCHDOG_S = 60                 # the supervisor pings at half of this
RESTART_DELAY_S = 5
DEFAULT_DOWNLOAD_DIR = "data/models"
SYSTEM_UNIT_DIR = "/etc/systemd/system"
LOG_FILE_NAME = "service.log"   # NSSM's / Task Scheduler's capture of stdout+stderr, beside daemon.log


class InstallError(Exception):
    """A reason the service cannot be installed, as one sentence a user can act on."""


# --- config.json (JSON with comments and trailing commas) ---------------------------------------

def read_jsonc(text: str):
    """Parse JSON that may contain `//` and `/* */` comments and trailing commas.

    Comments are blanked in place (newlines kept), so json's line/column still point into the file.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                line = text.count("\n", 0, i) + 1
                raise ValueError(f"unterminated /* comment at line {line}")
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j + 2]))
            i = j + 2
        else:
            out.append(c)
            i += 1
    blanked = "".join(out)
    # Drop commas whose next significant character closes an array or object (outside strings).
    chars = list(blanked)
    in_string = False
    k = 0
    while k < len(chars):
        ch = chars[k]
        if in_string:
            if ch == "\\":
                k += 2
                continue
            if ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == ",":
            m = k + 1
            while m < len(chars) and chars[m] in " \t\r\n":
                m += 1
            if m < len(chars) and chars[m] in "]}":
                chars[k] = " "
        k += 1
    return json.loads("".join(chars))


# --- what is installed where ---------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The checkout's paths as the service sees them (absolute, symlinks resolved)."""
    platform: str          # "linux" or "windows"
    checkout: str          # folder holding supervisor.py
    config: str            # config.json
    download_dir: str

    @property
    def path(self):
        return ntpath if self.platform == "windows" else posixpath

    @property
    def config_dir(self) -> str:
        return self.path.dirname(self.config)

    @property
    def data_dir(self) -> str:
        return self.path.join(self.config_dir, "data")

    @property
    def log_dir(self) -> str:
        return self.path.join(self.data_dir, "logs")

    @property
    def manifest(self) -> str:
        return self.path.join(self.config_dir, "manifest.json")

    @property
    def venv(self) -> str:
        return self.path.join(self.checkout, ".venv")

    @property
    def python(self) -> str:
        if self.platform == "windows":
            return self.path.join(self.venv, "Scripts", "python.exe")
        return self.path.join(self.venv, "bin", "python")

    @property
    def supervisor(self) -> str:
        return self.path.join(self.checkout, "supervisor.py")

    @property
    def daemon_argv(self) -> list[str]:
        return [self.python, self.supervisor, "--config", self.config]


def load_layout(checkout: str, config: str | None, platform: str) -> Layout:
    """Find the paths on this machine, reading download_dir from config.json (relative to the
    config's folder), with symlinks resolved as the daemon resolves them."""
    def real(path: str) -> str:
        return os.path.realpath(os.path.abspath(path))

    checkout = real(checkout)
    config = real(config if config else os.path.join(checkout, "config.json"))
    if not os.path.isfile(config):
        raise InstallError(f"There is no config file at {config}; create it (see README) or pass --config.")
    try:
        with open(config, encoding="utf-8-sig") as fh:
            values = read_jsonc(fh.read())
    except OSError as exc:
        raise InstallError(f"Cannot read {config}: {exc.strerror}.") from exc
    except ValueError as exc:
        raise InstallError(f"{config} is not valid JSON ({exc}); fix it first "
                           f"(`uv run python supervisor.py check` shows where).") from exc
    if not isinstance(values, dict):
        raise InstallError(f"{config} must hold a JSON object.")
    download = values.get("download_dir", DEFAULT_DOWNLOAD_DIR)
    if not isinstance(download, str) or not download.strip():
        raise InstallError(f"download_dir in {config} must be a non-empty path.")
    download = os.path.join(os.path.dirname(config), download.strip())   # an absolute path stays as it is
    return Layout(platform, checkout, config, real(download))


def check_paths(layout: Layout, private_tmp: Sequence[str] = ("/tmp", "/var/tmp")) -> None:
    """Refuse paths the service definition cannot take: spaces and quotes, and (Linux) folders the
    service's private /tmp hides."""
    for label, value in (("checkout", layout.checkout), ("config file", layout.config),
                         ("download folder", layout.download_dir)):
        if any(ch.isspace() for ch in value):
            raise InstallError(f"The {label} path {value!r} contains a space, which the service "
                               f"command line cannot take; move it to a path without spaces.")
        if layout.platform == "linux" and any(_under(value, t) for t in private_tmp):
            raise InstallError(f"The {label} path {value!r} is under /tmp, which the service does not see "
                               f"(it gets a private /tmp); move it to a lasting place.")
        bad = sorted({ch for ch in value if ch in "\"'`" or ord(ch) < 32
                      or (layout.platform == "linux" and ch in "\\:")})
        if bad:
            raise InstallError(f"The {label} path {value!r} contains {' '.join(map(repr, bad))}, which the "
                               f"service definition cannot take; move it to a plain path.")


# --- steps: what gets written and run ------------------------------------------------------------

@dataclass(frozen=True)
class MakeDir:
    path: str
    owner: tuple[str, str] | None = None   # (user, group) for a folder created by root

    def describe(self) -> str:
        return f"[mkdir] {self.path}" + (f" (owner {self.owner[0]}:{self.owner[1]})" if self.owner else "")


@dataclass(frozen=True)
class WriteFile:
    path: str
    text: str
    mode: int | None = 0o644     # None: leave it to the platform (Windows)
    encoding: str = "utf-8"

    def describe(self) -> str:
        body = self.text if self.text.endswith("\n") else self.text + "\n"
        mode = f"mode {self.mode:04o}, " if self.mode is not None else ""
        return f"[write] {self.path} ({mode}{self.encoding})\n{body}[end] {self.path}"


@dataclass(frozen=True)
class RemoveFile:
    path: str

    def describe(self) -> str:
        return f"[remove] {self.path}"


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    platform: str = "linux"
    check: bool = True       # False: a failure is reported and the rest goes on (stop what is not running)
    cwd: str | None = None

    def command_line(self) -> str:
        return subprocess.list2cmdline(self.argv) if self.platform == "windows" else shlex.join(self.argv)

    def describe(self) -> str:
        where = f"(in {self.cwd}) " if self.cwd else ""
        return f"[run] {where}{self.command_line()}" + ("" if self.check else "   # failure tolerated")


Step = MakeDir | WriteFile | RemoveFile | Run
# A step is a MakeDir, WriteFile, RemoveFile or Run. A runner takes (argv, cwd) and returns
# (exit code, output); tests pass a fake one.
Runner = Callable[[Sequence[str], str | None], tuple[int, str]]


def run_subprocess(argv: Sequence[str], cwd: str | None) -> tuple[int, str]:
    """The real runner: exit code and combined output of a command."""
    try:
        proc = subprocess.run(list(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", check=False)
    except OSError as exc:
        return 127, f"{argv[0]}: {exc.strerror}"
    return proc.returncode, proc.stdout


def execute(steps: Sequence, runner: Runner, say: Callable[[str], None]) -> None:
    for step in steps:
        say(step.describe().splitlines()[0] if isinstance(step, WriteFile) else step.describe())
        if isinstance(step, MakeDir):
            if os.path.isdir(step.path):
                continue
            try:
                os.makedirs(step.path, exist_ok=True)
                if step.owner:
                    shutil.chown(step.path, *step.owner)
            except OSError as exc:
                raise InstallError(f"Cannot create {step.path}: {exc.strerror}.") from exc
        elif isinstance(step, WriteFile):
            try:
                os.makedirs(os.path.dirname(step.path), exist_ok=True)
                tmp = step.path + ".tmp"
                with open(tmp, "w", encoding=step.encoding, newline="") as fh:
                    fh.write(step.text)
                if step.mode is not None:
                    os.chmod(tmp, step.mode)
                os.replace(tmp, step.path)
            except OSError as exc:
                raise InstallError(f"Cannot write {step.path}: {exc.strerror}.") from exc
        elif isinstance(step, RemoveFile):
            try:
                os.unlink(step.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise InstallError(f"Cannot remove {step.path}: {exc.strerror}.") from exc
        else:
            code, output = runner(step.argv, step.cwd)
            if code != 0:
                last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
                message = f"`{step.command_line()}` failed with exit code {code}" + (f": {last}" if last else "")
                if step.check:
                    raise InstallError(message + ".")
                say(f"  (ignored: {message})")


# --- the machine we install on -------------------------------------------------------------------

@dataclass
class Host:
    """Facts about the machine, injectable for tests."""
    platform: str
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    euid: int | None = None
    systemd_booted: bool = False
    is_admin: bool = False
    which: Callable[[str], str | None] = shutil.which
    system_unit_dir: str = SYSTEM_UNIT_DIR
    private_tmp: tuple[str, ...] = ("/tmp", "/var/tmp")   # hidden from the service by PrivateTmp=yes
    writable: Callable[[str], bool] = lambda path: os.access(path, os.W_OK)

    @classmethod
    def current(cls, platform: str) -> Host:
        euid = os.geteuid() if hasattr(os, "geteuid") else None
        is_admin = euid == 0
        if os.name == "nt":
            try:
                import ctypes
                is_admin = bool(ctypes.windll.shell32.IsUserAnAdmin())  # type: ignore[attr-defined]
            except (AttributeError, OSError):
                is_admin = False
        # sd_booted(): systemd is PID 1 exactly when this folder exists.
        return cls(platform=platform, euid=euid, systemd_booted=os.path.isdir("/run/systemd/system"),
                   is_admin=is_admin)

    def user_unit_dir(self) -> str:
        base = self.environ.get("XDG_CONFIG_HOME") or posixpath.join(
            self.environ.get("HOME") or os.path.expanduser("~"), ".config")
        return posixpath.join(base, "systemd", "user")

    def has_user_manager(self) -> bool:
        runtime = self.environ.get("XDG_RUNTIME_DIR")
        return bool(runtime) and os.path.exists(posixpath.join(runtime or "", "systemd", "private"))


# --- Linux: the systemd unit ---------------------------------------------------------------------

def _escape(value: str) -> str:
    """A path as a unit-file word: `%` is a specifier and `$` an environment reference in ExecStart."""
    return value.replace("%", "%%").replace("$", "$$")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def interpreter_dirs(layout: Layout) -> list[str]:
    """The installation folder(s) of the Python the venv runs on: pyvenv.cfg's `home`, and where
    .venv/bin/python's symlinks lead. Empty while the venv does not exist."""
    found = []
    try:
        with open(posixpath.join(layout.venv, "pyvenv.cfg"), encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition("=")
                if key.strip() == "home" and value.strip():
                    found.append(posixpath.dirname(os.path.realpath(value.strip())))
    except OSError:
        pass
    if os.path.exists(layout.python):
        found.append(posixpath.dirname(posixpath.dirname(os.path.realpath(layout.python))))
    return [d for d in dict.fromkeys(found) if not _under(d, layout.venv)]


def home_roots() -> list[str]:
    """The folders ProtectHome= hides, as real paths (/home may be a symlink, e.g. to /var/home)."""
    return sorted({os.path.realpath(p) for p in ("/home", "/root", "/run/user")} | {"/home", "/root", "/run/user"})


def _read_only_entries(layout: Layout, writable: Sequence[str]) -> list[str]:
    """Entries of the checkout that stay read-only although its folder is writable (the code,
    the environment, .git): everything present now except data, config, manifest and download folders."""
    keep = {posixpath.basename(layout.config), "manifest.json", "data"}
    entries = []
    try:
        names = sorted(os.listdir(layout.checkout))
    except OSError:
        names = []
    for name in names:
        full = posixpath.join(layout.checkout, name)
        if name in keep or (name.startswith(".") and name.endswith(".tmp")):
            continue
        if any(_under(w, full) for w in writable):   # an entry holding a writable folder stays writable
            continue
        entries.append(full)
    return entries


def systemd_unit(layout: Layout, user_unit: bool, run_as: tuple[str, str] | None,
                 interpreters: Sequence[str] = (), read_only_entries: Sequence[str] | None = None) -> str:
    """The unit file text for this checkout. `run_as` is (user, group) for a system unit;
    `interpreters` are folders of the Python installation to keep readable (see interpreter_dirs)."""
    homes = home_roots()

    def in_home(p: str) -> bool:
        return any(_under(p, h) for h in homes)

    # Writable: the config folder (manifest.json is replaced atomically through a temp file beside
    # it, so the folder itself must be writable), data/ below it, and the download folder.
    writable: list[str] = []
    for p in (layout.config_dir, layout.data_dir, layout.download_dir):
        if not any(_under(p, w) for w in writable):
            writable = [w for w in writable if not _under(w, p)] + [p]
    readable: list[str] = []
    if not any(_under(layout.checkout, w) for w in writable):
        readable.append(layout.checkout)
    for folder in interpreters:
        if in_home(folder) and not any(_under(folder, p) for p in writable + readable):
            readable.append(folder)
    if read_only_entries is None:
        read_only_entries = _read_only_entries(layout, writable) if layout.config_dir == layout.checkout else []
    # No executable files among the downloads. Only where no other setting names the same path:
    # systemd keeps one entry per path and may drop the noexec one.
    named = set(writable) | set(readable) | set(read_only_entries)
    no_exec = [p for p in dict.fromkeys((layout.data_dir, layout.download_dir))
               if p not in named and not any(_under(p, q) and p != q for q in (layout.data_dir, layout.download_dir))]

    def words(paths: Sequence[str], prefix: str = "") -> str:
        return " ".join(prefix + _escape(p) for p in paths)

    lines = [
        "# Written by install.py for the checkout in " + _escape(layout.checkout) + "; remove with",
        "# `python install.py --uninstall" + (" --user" if user_unit else "") + "`, not by hand.",
        "[Unit]",
        f"Description={DESCRIPTION} ({_escape(layout.checkout)})",
        f"Documentation=file://{_escape(layout.checkout)}/README.md",
    ]
    if not user_unit:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "# The supervisor sends READY=1 once the web process answers /health, STOPPING=1 when it",
        "# drains, and WATCHDOG=1 from its main loop.",
        "Type=notify",
        "NotifyAccess=main",
        f"WatchdogSec={WATCHDOG_S}",
    ]
    if run_as:
        lines += [f"User={run_as[0]}", f"Group={run_as[1]}"]
    lines += [
        f"WorkingDirectory={_escape(layout.checkout)}",
        "Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
        "ExecStart=" + " ".join(_escape(a) for a in layout.daemon_argv),
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY_S}",
        f"# {EX_CONFIG} is a bad config.json or manifest.json: restarting would only loop.",
        f"RestartPreventExitStatus={EX_CONFIG}",
        f"# SIGTERM to the supervisor only: it stops its children and exits within {DAEMON_DRAIN_S} s;",
        "# whatever is left after TimeoutStopSec is killed.",
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "TimeoutStartSec=90",
        "",
        "# Sandbox: read-only system, private /tmp and /dev, no privileges, network only.",
        "# Downloaded models are meant to be read by other programs, hence the usual umask.",
        "UMask=0022",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "KeyringMode=private",
        "PrivateUsers=yes",
        "PrivateMounts=yes",
        "ProtectSystem=strict",
        "ProtectHome=tmpfs",
    ]
    binds_ro = [p for p in readable if in_home(p)]
    binds_rw = [p for p in writable if in_home(p)]
    rw_paths = [p for p in writable if not in_home(p)]
    if binds_ro:
        lines.append("BindReadOnlyPaths=" + words(binds_ro))
    if binds_rw:
        lines.append("BindPaths=" + words(binds_rw))
    if rw_paths:
        lines.append("ReadWritePaths=" + words(rw_paths))
    if read_only_entries:
        lines.append("# The code and its environment stay read-only inside the writable config folder.")
        lines.append("ReadOnlyPaths=" + words(read_only_entries, "-"))
    if no_exec:
        lines.append("NoExecPaths=" + words(no_exec))
    lines += [
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "PrivateIPC=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
    ]
    if not user_unit:
        lines.append("ProtectProc=invisible")
    lines += [
        "# Internet for Civitai, the LAN API and webhooks; AF_UNIX for the sd_notify socket.",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "",
        "[Install]",
        "WantedBy=" + ("default.target" if user_unit else "multi-user.target"),
    ]
    return "\n".join(lines) + "\n"


def _service_account(layout: Layout, host: Host, run_as: str | None) -> tuple[str, str]:
    """(user, group) a system unit runs as: --run-as, else the sudo caller, else the checkout's owner."""
    try:
        import grp
        import pwd
    except ImportError:      # a Linux dry run on Windows: no account database to ask
        user = run_as or host.environ.get("USERNAME") or "user"
        return user, user
    name: str | None = run_as or (host.environ.get("SUDO_USER")
                                  if host.environ.get("SUDO_USER") not in (None, "", "root") else None)
    if not name:
        try:
            name = pwd.getpwuid(os.stat(layout.checkout).st_uid).pw_name
        except (KeyError, OSError):
            name = None
    if not name or name == "root":
        raise InstallError("The service would run as root; make the checkout belong to a normal user "
                           "or pass --run-as USER.")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InstallError(f"There is no user named {name!r} on this system.") from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return name, group


def _nearest_existing(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def linux_steps(layout: Layout, host: Host, user_unit: bool, uninstall: bool, dry_run: bool,
                name: str = SERVICE_NAME, run_as: str | None = None,
                warn: Callable[[str], None] = lambda _m: None) -> list[Step]:
    unit_dir = host.user_unit_dir() if user_unit else host.system_unit_dir
    unit_path = posixpath.join(unit_dir, f"{name}.service")
    systemctl = ("systemctl", "--user") if user_unit else ("systemctl",)

    def problem(message: str) -> None:
        if dry_run:
            warn(message)
        else:
            raise InstallError(message)

    target = _nearest_existing(unit_dir)
    if not host.systemd_booted:
        problem("systemd is not running on this machine (no /run/systemd/system), so there is no service "
                "manager to install into.")
    elif user_unit and host.euid == 0:
        problem("A user unit belongs to the user who runs install.py; run it without sudo, or drop --user "
                "for a system unit.")
    elif user_unit and not host.has_user_manager():
        problem("There is no systemd user instance for this session (no $XDG_RUNTIME_DIR/systemd/private); "
                "log in normally (not through su or sudo), or install a system unit with sudo.")
    elif not user_unit and host.euid not in (0, None):
        problem("Installing a system unit needs root; run it with sudo, or pass --user for a user unit.")
    elif not host.writable(target):
        problem(f"No write access to {target}, where the unit file goes.")

    if uninstall:
        u = f"{name}.service"
        return [
            Run((*systemctl, "disable", "--now", u), check=False),
            Run((*systemctl, "reset-failed", u), check=False),   # forget a failed state, while still loaded
            RemoveFile(unit_path),
            Run((*systemctl, "daemon-reload")),
        ]

    check_paths(layout, host.private_tmp)
    account = None if user_unit else _service_account(layout, host, run_as)
    steps: list[Step] = []
    for folder in (layout.data_dir, layout.download_dir):
        if not os.path.isdir(folder):
            # ProtectSystem=strict: the service could not create them itself, and a missing
            # ReadWritePaths= folder stops the unit from starting.
            steps.append(MakeDir(folder, account if host.euid == 0 else None))
    interpreters = interpreter_dirs(layout)
    for folder in interpreters:
        if account and _under(folder, os.path.realpath("/root")):
            raise InstallError(f"The environment's Python lives in {folder}, which {account[0]} cannot read; "
                               f"recreate .venv as {account[0]} with `uv sync`.")
    steps.append(WriteFile(unit_path, systemd_unit(layout, user_unit, account, interpreters)))
    steps += [
        Run((*systemctl, "daemon-reload")),
        Run((*systemctl, "enable", f"{name}.service")),
        Run((*systemctl, "restart", f"{name}.service")),   # starts it, or reloads a reinstalled unit
    ]
    return steps


# --- Windows: NSSM or Task Scheduler -------------------------------------------------------------

def nssm_steps(layout: Layout, uninstall: bool, name: str = SERVICE_NAME, nssm: str = "nssm") -> list[Step]:
    def run(*args: str, check: bool = True) -> Run:
        return Run((nssm, *args), platform="windows", check=check)

    removal: list[Step] = [run("stop", name, check=False), run("remove", name, "confirm", check=False)]
    if uninstall:
        return removal
    log = ntpath.join(layout.log_dir, LOG_FILE_NAME)
    python, *args = layout.daemon_argv
    return [
        MakeDir(layout.log_dir),
        *removal,                                  # a reinstall replaces the old definition
        run("install", name, python, *args),
        run("set", name, "AppDirectory", layout.checkout),
        run("set", name, "DisplayName", DESCRIPTION),
        run("set", name, "Description", f"{DESCRIPTION} for {layout.checkout}"),
        run("set", name, "Start", "SERVICE_DELAYED_AUTO_START"),
        run("set", name, "AppStdout", log),
        run("set", name, "AppStderr", log),
        run("set", name, "AppRotateFiles", "1"),
        run("set", name, "AppRotateOnline", "1"),
        run("set", name, "AppRotateBytes", str(10 * 1024 * 1024)),
        run("set", name, "AppEnvironmentExtra", "PYTHONUNBUFFERED=1"),
        # Ctrl-C first (the daemon drains within 20 s), then wait before harder methods.
        run("set", name, "AppStopMethodConsole", str(STOP_TIMEOUT_S * 1000)),
        run("set", name, "AppExit", "Default", "Restart"),
        run("set", name, "AppExit", str(EX_CONFIG), "Exit"),
        run("set", name, "AppRestartDelay", str(RESTART_DELAY_S * 1000)),
        run("start", name),
    ]


def _xml_escape(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def task_xml(layout: Layout, at_logon: bool, user_id: str) -> str:
    """A Task Scheduler definition: at boot (S4U: no stored password, no window) or at the user's
    logon; no 72-hour time limit (schtasks' default), restart after a failure."""
    log = ntpath.join(layout.log_dir, LOG_FILE_NAME)
    inner = subprocess.list2cmdline(layout.daemon_argv) + f' >> "{log}" 2>&1'
    arguments = f'/d /c "{inner}"'
    if at_logon:
        trigger = ["    <LogonTrigger>", "      <Enabled>true</Enabled>",
                   f"      <UserId>{_xml_escape(user_id)}</UserId>", "    </LogonTrigger>"]
        logon_type = "InteractiveToken"
    else:
        trigger = ["    <BootTrigger>", "      <Enabled>true</Enabled>", "      <Delay>PT30S</Delay>",
                   "    </BootTrigger>"]
        logon_type = "S4U"
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-16"?>',
        '<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">',
        "  <RegistrationInfo>",
        f"    <Description>{_xml_escape(DESCRIPTION)} for {_xml_escape(layout.checkout)}</Description>",
        "  </RegistrationInfo>",
        "  <Triggers>",
        *trigger,
        "  </Triggers>",
        "  <Principals>",
        '    <Principal id="Author">',
        f"      <UserId>{_xml_escape(user_id)}</UserId>",
        f"      <LogonType>{logon_type}</LogonType>",
        "      <RunLevel>LeastPrivilege</RunLevel>",
        "    </Principal>",
        "  </Principals>",
        "  <Settings>",
        "    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>",
        "    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>",
        "    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>",
        "    <AllowHardTerminate>true</AllowHardTerminate>",
        "    <StartWhenAvailable>true</StartWhenAvailable>",
        "    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>",
        "    <IdleSettings>",
        "      <StopOnIdleEnd>false</StopOnIdleEnd>",
        "      <RestartOnIdle>false</RestartOnIdle>",
        "    </IdleSettings>",
        "    <AllowStartOnDemand>true</AllowStartOnDemand>",
        "    <Enabled>true</Enabled>",
        "    <Hidden>false</Hidden>",
        "    <RunOnlyIfIdle>false</RunOnlyIfIdle>",
        "    <WakeToRun>false</WakeToRun>",
        "    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>",
        "    <Priority>7</Priority>",
        "    <RestartOnFailure>",
        "      <Interval>PT1M</Interval>",
        "      <Count>255</Count>",  # the schema's unsignedByte: 999 is refused
        "    </RestartOnFailure>",
        "  </Settings>",
        '  <Actions Context="Author">',
        "    <Exec>",
        r"      <Command>%SystemRoot%\System32\cmd.exe</Command>",
        f"      <Arguments>{_xml_escape(arguments)}</Arguments>",
        f"      <WorkingDirectory>{_xml_escape(layout.checkout)}</WorkingDirectory>",
        "    </Exec>",
        "  </Actions>",
        "</Task>",
    ]) + "\n"


def schtasks_steps(layout: Layout, uninstall: bool, at_logon: bool, user_id: str,
                   name: str = SERVICE_NAME) -> list[Step]:
    def run(*args: str, check: bool = True) -> Run:
        return Run(("schtasks", *args), platform="windows", check=check)

    removal: list[Step] = [run("/End", "/TN", name, check=False), run("/Delete", "/TN", name, "/F", check=False)]
    if uninstall:
        return removal
    xml_path = ntpath.join(layout.data_dir, f"{name}.task.xml")
    return [
        MakeDir(layout.log_dir),
        WriteFile(xml_path, task_xml(layout, at_logon, user_id), mode=None, encoding="utf-16"),
        run("/Create", "/TN", name, "/XML", xml_path, "/F"),   # /F replaces an earlier definition
        RemoveFile(xml_path),
        run("/Run", "/TN", name),
    ]


def windows_steps(layout: Layout, host: Host, user_unit: bool, uninstall: bool, dry_run: bool,
                  name: str = SERVICE_NAME, warn: Callable[[str], None] = lambda _m: None) -> list[Step]:
    nssm = host.which("nssm")
    if uninstall:
        # Remove whichever is there; both removals tolerate "not installed".
        return (nssm_steps(layout, True, name, nssm or "nssm") if nssm or dry_run else []) + \
            schtasks_steps(layout, True, user_unit, "", name)
    check_paths(layout)
    if user_unit:
        nssm = None          # --user: a task at the user's logon, which needs no elevation
    if (nssm or not user_unit) and not host.is_admin:
        message = ("Installing an NSSM service needs an elevated (administrator) prompt; run it as administrator."
                   if nssm else
                   "A task that starts at boot needs an elevated (administrator) prompt; run it as administrator, "
                   "or pass --user for a task that starts when you log on.")
        if not dry_run:
            raise InstallError(message)
        warn(message)
    if nssm:
        return nssm_steps(layout, False, name, nssm)
    domain = host.environ.get("USERDOMAIN", "")
    user = host.environ.get("USERNAME") or host.environ.get("USER") or getpass.getuser()
    user_id = f"{domain}\\{user}" if domain else user
    return schtasks_steps(layout, False, user_unit, user_id, name)


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="install.py", description=__doc__.splitlines()[0])
    parser.add_argument("--user", action="store_true",
                        help="Linux: a user unit (systemctl --user); Windows: a Task Scheduler task at your "
                             "logon, which needs no administrator")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be written and run, change nothing")
    parser.add_argument("--uninstall", action="store_true", help="stop, disable and remove the service")
    parser.add_argument("--platform", choices=("linux", "windows"),
                        help="default: this machine's (windows on Windows, else linux)")
    parser.add_argument("--config", help="the daemon's config.json (default: config.json in the checkout)")
    parser.add_argument("--name", default=SERVICE_NAME, help=f"service name (default {SERVICE_NAME})")
    parser.add_argument("--run-as", metavar="USER",
                        help="Linux system unit: the account the daemon runs as "
                             "(default: the sudo caller, else the checkout's owner)")
    return parser


def main(argv: Sequence[str] | None = None, *, host: Host | None = None, runner: Runner = run_subprocess,
         checkout: str | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    platform = args.platform or ("windows" if os.name == "nt" else "linux")
    if platform == "linux" and not args.platform and not sys.platform.startswith("linux"):
        print(f"install.py: only Linux (systemd) and Windows are supported, not {sys.platform}; "
              "pass --platform with --dry-run to see what it would do.", file=err)
        return 1
    host = host or Host.current(platform)
    checkout = checkout or os.path.dirname(os.path.abspath(__file__))
    name = args.name
    if not name.replace("-", "").replace("_", "").isalnum():
        print(f"install.py: the service name {name!r} may hold only letters, digits, '-' and '_'.", file=err)
        return 2

    def say(line: str) -> None:
        print(line, file=out)

    def warn(line: str) -> None:
        print(f"warning: {line}", file=err)

    try:
        if args.uninstall:
            try:
                layout = load_layout(checkout, args.config, platform)
            except InstallError:
                # Removing the service must not depend on a readable config.
                pm = ntpath if platform == "windows" else posixpath
                layout = Layout(platform, checkout, args.config or pm.join(checkout, "config.json"),
                                pm.join(checkout, DEFAULT_DOWNLOAD_DIR))
        else:
            layout = load_layout(checkout, args.config, platform)
        prepare: list[Step] = []
        venv_missing = not os.path.exists(layout.python) and not args.uninstall
        if venv_missing:
            uv = host.which("uv")
            if host.euid == 0:
                message = (f"There is no .venv in {layout.checkout} yet; run `uv sync` there as the user the "
                           "service runs as, then run install.py again.")
                if not args.dry_run:
                    raise InstallError(message)
                warn(message)
            elif not uv and not args.dry_run:
                raise InstallError(f"There is no .venv in {layout.checkout} and no `uv` on the PATH to make it; "
                                   "install uv (https://docs.astral.sh/uv/) and run `uv sync`.")
            prepare.append(Run((uv or "uv", "sync", "--frozen"), platform=platform, cwd=layout.checkout))

        def plan() -> list[Step]:
            if platform == "windows":
                return windows_steps(layout, host, args.user, args.uninstall, args.dry_run, name, warn)
            return linux_steps(layout, host, args.user, args.uninstall, args.dry_run, name, args.run_as, warn)

        if args.dry_run:
            steps = prepare + plan()
            say(f"# dry run: install.py would do this ({platform}"
                f"{', user' if args.user else ''}{', uninstall' if args.uninstall else ''}); nothing was changed")
            if venv_missing and platform == "linux" and not args.uninstall:
                say("# (the unit below is written after `uv sync`, and then also grants read access to the "
                    "interpreter it installs if that lives under a home folder)")
            for step in steps:
                say(step.describe())
            return 0
        steps = plan()              # refuses before anything changes (no systemd, not root, ...)
        if prepare:
            execute(prepare, runner, say)
            steps = plan()          # again, now that the environment and its interpreter exist
        execute(steps, runner, say)
    except InstallError as exc:
        print(f"install.py: {exc}", file=err)
        return 1
    say(_closing_note(platform, args, name, host))
    return 0


def _closing_note(platform: str, args, name: str, host: Host) -> str:
    if args.uninstall:
        return f"Removed the {name} service (downloads, data/ and config stay where they are)."
    if platform == "windows":
        if host.which("nssm") and not args.user:
            return f"Installed and started the NSSM service {name}; `nssm status {name}`, logs in data\\logs."
        return (f"Registered and started the Task Scheduler task {name}; `schtasks /Query /TN {name}`, "
                "logs in data\\logs.")
    ctl = "systemctl --user" if args.user else "systemctl"
    journal = "journalctl --user-unit" if args.user else "journalctl -u"
    note = f"Installed and started {name}.service: `{ctl} status {name}`, `{journal} {name} -f`."
    if args.user:
        user = host.environ.get("USER", "$USER")
        note += f" To start it at boot without logging in: `loginctl enable-linger {user}`."
    return note


if __name__ == "__main__":
    sys.exit(main())
