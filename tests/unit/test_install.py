"""install.py: the systemd unit (checked by systemd-analyze), the Windows commands, --dry-run and
--uninstall, all without a running service manager (a fake runner records the commands)."""
from __future__ import annotations

import io
import pwd
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import install
from install import Host, Layout


def service_account() -> str:
    """An existing unprivileged account (systemd-analyze frowns on 'nobody')."""
    for entry in pwd.getpwall():
        if 0 < entry.pw_uid < 65534 and entry.pw_name != "nobody":
            return entry.pw_name
    pytest.skip("no unprivileged account on this machine")


def make_checkout(root: Path, config: str | None = None, venv: bool = True) -> Path:
    checkout = root / "civitai"
    checkout.mkdir(parents=True)
    (checkout / "supervisor.py").write_text("# the daemon\n")
    (checkout / "install.py").write_text("# this installer\n")
    (checkout / "ipc").mkdir()
    (checkout / "manifest.json").write_text("[]\n")
    (checkout / "config.json").write_text(config if config is not None else
                                          '{\n  // shipped config\n  "active_port": 8000,\n}\n')
    if venv:
        python = checkout / ".venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text("#!/bin/sh\nexit 0\n")
        python.chmod(0o755)
    return checkout


class FakeRunner:
    """Records commands instead of running them; `fail` maps a command's words to an exit code."""

    def __init__(self, fail: dict[str, int] | None = None, on_run=None):
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.fail = fail or {}
        self.on_run = on_run

    def __call__(self, argv, cwd):
        argv = tuple(argv)
        self.calls.append((argv, cwd))
        if self.on_run:
            self.on_run(argv, cwd)
        return self.fail.get(" ".join(argv), 0), "boom\n" if " ".join(argv) in self.fail else ""

    @property
    def commands(self) -> list[str]:
        return [" ".join(argv) for argv, _ in self.calls]


def linux_host(tmp_path: Path, **overrides) -> Host:
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    values = dict(platform="linux", environ={"HOME": str(tmp_path / "home")}, euid=0, systemd_booted=True,
                  which=lambda name: None, system_unit_dir=str(unit_dir), private_tmp=())
    values.update(overrides)
    return Host(**values)


def run_main(argv, **kw) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = install.main(argv, out=out, err=err, **kw)
    return code, out.getvalue(), err.getvalue()


def tree(root: Path) -> dict[str, tuple]:
    """Every file and folder below root with its content and mode: a change anywhere shows."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if path.is_file() else None)
    return found


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# --- config.json ---------------------------------------------------------------------------------

def test_read_jsonc_takes_comments_and_trailing_commas_but_not_inside_strings():
    text = """{
      // a comment, with "quotes"
      "a": "http://x/y", /* block
      comment */ "b": [1, 2, ],
      "c": "keeps // and /* */ and ,] inside",
      "d": {"e": "\\\\", },
    }"""
    assert install.read_jsonc(text) == {"a": "http://x/y", "b": [1, 2], "c": "keeps // and /* */ and ,] inside",
                                        "d": {"e": "\\"}}


def test_read_jsonc_errors_keep_the_line_number():
    with pytest.raises(ValueError, match="line 3"):
        install.read_jsonc('{\n  // fine /* not a block */\n  "a": 1 "b": 2\n}')
    with pytest.raises(ValueError, match="unterminated"):
        install.read_jsonc('{"a": 1 /* open')


def test_download_dir_resolves_against_the_config_folder(tmp_path):
    checkout = make_checkout(tmp_path)
    layout = install.load_layout(str(checkout), None, "linux")
    assert layout.download_dir == str(checkout / "data" / "models")
    assert layout.data_dir == str(checkout / "data")

    elsewhere = tmp_path / "cfg"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text('{"download_dir": "models", /* c */}')
    layout = install.load_layout(str(checkout), str(elsewhere / "config.json"), "linux")
    assert layout.download_dir == str(elsewhere / "models")
    assert layout.config_dir == str(elsewhere)

    (elsewhere / "config.json").write_text('{"download_dir": "/srv/models"}')
    assert install.load_layout(str(checkout), str(elsewhere / "config.json"), "linux").download_dir == "/srv/models"


# --- the unit --------------------------------------------------------------------------------------

def write_unit(tmp_path: Path, layout: Layout, user_unit: bool = False, **kw) -> Path:
    account = None if user_unit else (service_account(), service_account())
    path = tmp_path / "units" / f"{install.SERVICE_NAME}.service"
    path.parent.mkdir(exist_ok=True)
    path.write_text(install.systemd_unit(layout, user_unit, account, **kw))
    return path


def test_unit_runs_the_checkouts_environment_and_restarts_sensibly(tmp_path):
    checkout = make_checkout(tmp_path)
    layout = install.load_layout(str(checkout), None, "linux")
    s = unit_settings(write_unit(tmp_path, layout).read_text())
    assert s["ExecStart"] == [f"{checkout}/.venv/bin/python {checkout}/supervisor.py --config {checkout}/config.json"]
    assert s["WorkingDirectory"] == [str(checkout)]
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) >= 10
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["KillMode"] == ["mixed"]
    assert int(s["TimeoutStopSec"][0]) > 20
    assert s["User"] == [service_account()]
    assert s["WantedBy"] == ["multi-user.target"]
    for option in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                   "ProtectKernelModules", "ProtectControlGroups", "MemoryDenyWriteExecute"):
        assert s[option] == ["yes"], option
    assert s["ProtectSystem"] == ["strict"]
    assert "@system-service" in s["SystemCallFilter"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_unit_writes_only_config_folder_data_and_downloads_and_keeps_the_code_read_only(tmp_path):
    checkout = make_checkout(tmp_path)
    layout = install.load_layout(str(checkout), None, "linux")
    s = unit_settings(write_unit(tmp_path, layout).read_text())
    assert s["ReadWritePaths"] == [str(checkout)]          # manifest.json's atomic replace needs the folder
    read_only = s["ReadOnlyPaths"][0].split()
    assert f"-{checkout}/.venv" in read_only and f"-{checkout}/supervisor.py" in read_only
    assert f"-{checkout}/ipc" in read_only and f"-{checkout}/install.py" in read_only
    assert not any(p.lstrip("-") in (f"{checkout}/data", f"{checkout}/config.json", f"{checkout}/manifest.json")
                   for p in read_only)
    assert s["NoExecPaths"] == [f"{checkout}/data"]


def test_unit_under_home_binds_what_it_needs_into_an_empty_home(tmp_path):
    layout = Layout("linux", "/home/ann/civitai", "/home/ann/civitai/config.json", "/home/ann/models")
    text = install.systemd_unit(layout, False, ("ann", "ann"), ["/home/ann/.local/share/uv/python/cpython-3.11"],
                                read_only_entries=["/home/ann/civitai/.venv"])
    s = unit_settings(text)
    assert s["ProtectHome"] == ["tmpfs"]
    assert s["BindPaths"] == ["/home/ann/civitai /home/ann/models"]
    assert s["BindReadOnlyPaths"] == ["/home/ann/.local/share/uv/python/cpython-3.11"]
    assert "ReadWritePaths" not in s
    assert s["NoExecPaths"] == ["/home/ann/civitai/data"]   # the download folder is a bind already


def test_unit_escapes_specifiers(tmp_path):
    layout = Layout("linux", "/srv/100%", "/srv/100%/config.json", "/srv/100%/data/models")
    s = unit_settings(install.systemd_unit(layout, False, ("ann", "ann"), read_only_entries=[]))
    assert s["WorkingDirectory"] == ["/srv/100%%"]


# --- installing and removing on Linux --------------------------------------------------------------

def test_install_writes_the_unit_then_enables_and_starts_it(tmp_path):
    checkout = make_checkout(tmp_path)
    host = linux_host(tmp_path)
    runner = FakeRunner()
    code, out, err = run_main(["--run-as", service_account()], host=host, runner=runner, checkout=str(checkout))
    assert code == 0, err
    unit = Path(host.system_unit_dir) / "civitai-daemon.service"
    assert unit.stat().st_mode & 0o777 == 0o644
    assert "Type=notify" in unit.read_text()
    assert runner.commands == ["systemctl daemon-reload", "systemctl enable civitai-daemon.service",
                               "systemctl restart civitai-daemon.service"]
    assert (checkout / "data" / "models").is_dir()     # ReadWritePaths= needs it to exist
    assert "systemctl status civitai-daemon" in out


def test_install_then_uninstall_leaves_no_trace(tmp_path):
    checkout = make_checkout(tmp_path)
    (checkout / "data" / "models").mkdir(parents=True)
    host = linux_host(tmp_path)
    before = tree(tmp_path)
    assert run_main(["--run-as", service_account()], host=host, runner=FakeRunner(), checkout=str(checkout))[0] == 0
    assert tree(tmp_path) != before
    runner = FakeRunner(fail={"systemctl reset-failed civitai-daemon.service": 1})
    code, out, err = run_main(["--uninstall"], host=host, runner=runner, checkout=str(checkout))
    assert code == 0, err
    assert runner.commands == ["systemctl disable --now civitai-daemon.service",
                               "systemctl reset-failed civitai-daemon.service", "systemctl daemon-reload"]
    assert tree(tmp_path) == before


def test_user_unit_goes_to_the_users_config_and_uses_systemctl_user(tmp_path):
    checkout = make_checkout(tmp_path)
    runtime = tmp_path / "run"
    (runtime / "systemd").mkdir(parents=True)
    (runtime / "systemd" / "private").touch()
    home = tmp_path / "home"
    host = linux_host(tmp_path, euid=1000, environ={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime),
                                                    "USER": "ann"})
    runner = FakeRunner()
    code, out, err = run_main(["--user"], host=host, runner=runner, checkout=str(checkout))
    assert code == 0, err
    unit = home / ".config" / "systemd" / "user" / "civitai-daemon.service"
    assert "WantedBy=default.target" in unit.read_text()
    assert runner.commands == ["systemctl --user daemon-reload", "systemctl --user enable civitai-daemon.service",
                               "systemctl --user restart civitai-daemon.service"]
    assert "loginctl enable-linger ann" in out
    code, _, err = run_main(["--user", "--uninstall"], host=host, runner=runner, checkout=str(checkout))
    assert code == 0, err
    assert not unit.exists()


def test_missing_venv_is_made_with_uv_sync_first(tmp_path):
    checkout = make_checkout(tmp_path, venv=False)
    runtime = tmp_path / "run"
    (runtime / "systemd").mkdir(parents=True)
    (runtime / "systemd" / "private").touch()
    host = linux_host(tmp_path, euid=1000, which=lambda name: "/usr/bin/uv" if name == "uv" else None,
                      environ={"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(runtime)})

    def make_venv(argv, cwd):
        if argv[1:] == ("sync", "--frozen"):
            python = Path(cwd) / ".venv" / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.write_text("#!/bin/sh\n")

    runner = FakeRunner(on_run=make_venv)
    code, out, err = run_main(["--user"], host=host, runner=runner, checkout=str(checkout))
    assert code == 0, err
    assert runner.calls[0] == (("/usr/bin/uv", "sync", "--frozen"), str(checkout))


def test_nothing_is_synced_when_the_install_would_fail_anyway(tmp_path):
    checkout = make_checkout(tmp_path, venv=False)
    runner = FakeRunner()
    code, out, err = run_main(["--user"], runner=runner, checkout=str(checkout),
                              host=linux_host(tmp_path, euid=1000, systemd_booted=False, which=lambda n: "/usr/bin/uv"))
    assert code == 1 and "systemd is not running" in err
    assert runner.calls == []


def test_missing_venv_under_sudo_asks_for_uv_sync_as_the_user(tmp_path):
    checkout = make_checkout(tmp_path, venv=False)
    runner = FakeRunner()
    code, out, err = run_main(["--run-as", service_account()], runner=runner, checkout=str(checkout),
                              host=linux_host(tmp_path, which=lambda name: "/usr/bin/uv"))
    assert code == 1 and runner.calls == []
    assert err.startswith(f"install.py: There is no .venv in {checkout} yet; run `uv sync` there")


def test_a_failing_command_stops_the_install_with_one_sentence(tmp_path):
    checkout = make_checkout(tmp_path)
    runner = FakeRunner(fail={"systemctl enable civitai-daemon.service": 1})
    code, out, err = run_main(["--run-as", service_account()], host=linux_host(tmp_path), runner=runner,
                              checkout=str(checkout))
    assert code == 1
    assert err.strip() == "install.py: `systemctl enable civitai-daemon.service` failed with exit code 1: boom."
    assert "systemctl restart civitai-daemon.service" not in runner.commands


@pytest.mark.parametrize("case, argv, host_overrides, expected", [
    ("no systemd", [], {"systemd_booted": False}, "systemd is not running on this machine"),
    ("not root", [], {"euid": 1000}, "Installing a system unit needs root; run it with sudo"),
    ("no write access", [], {"writable": lambda path: False}, "No write access to"),
    ("user unit as root", ["--user"], {}, "A user unit belongs to the user who runs install.py"),
    ("no user manager", ["--user"], {"euid": 1000}, "There is no systemd user instance"),
    ("runs as root", ["--run-as", "root"], {}, "The service would run as root"),
])
def test_errors_are_one_clear_sentence(tmp_path, case, argv, host_overrides, expected):
    checkout = make_checkout(tmp_path)
    host = linux_host(tmp_path, **host_overrides)
    before = tree(tmp_path)
    runner = FakeRunner()
    code, out, err = run_main(argv, host=host, runner=runner, checkout=str(checkout))
    assert code == 1
    assert err.startswith(f"install.py: {expected}"), err
    assert err.count("\n") == 1 and err.rstrip().endswith("."), err
    assert runner.calls == [] and tree(tmp_path) == before


def test_a_path_with_spaces_is_refused(tmp_path):
    checkout = make_checkout(tmp_path / "my models")
    code, out, err = run_main(["--run-as", service_account()], host=linux_host(tmp_path), runner=FakeRunner(),
                              checkout=str(checkout))
    assert code == 1
    assert "contains a space" in err and err.count("\n") == 1
    assert not (Path(linux_host(tmp_path).system_unit_dir) / "civitai-daemon.service").exists()


def test_a_checkout_under_tmp_is_refused(tmp_path):
    checkout = make_checkout(tmp_path)
    host = linux_host(tmp_path, private_tmp=(str(tmp_path),))
    code, out, err = run_main(["--run-as", service_account()], host=host, runner=FakeRunner(), checkout=str(checkout))
    assert code == 1 and "private /tmp" in err


def test_a_broken_config_is_named(tmp_path):
    checkout = make_checkout(tmp_path, config='{"download_dir": }')
    code, out, err = run_main(["--run-as", service_account()], host=linux_host(tmp_path), runner=FakeRunner(),
                              checkout=str(checkout))
    assert code == 1 and "config.json is not valid JSON" in err


# --- --dry-run ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["--user"], ["--uninstall"], ["--platform", "windows"],
                                  ["--platform", "windows", "--user"], ["--platform", "windows", "--uninstall"]])
def test_dry_run_prints_everything_and_changes_nothing(tmp_path, argv):
    checkout = make_checkout(tmp_path, venv=False)
    # Nothing in its way (no systemd, not root): a dry run still shows the whole plan.
    host = linux_host(tmp_path, systemd_booted=False, euid=1000, platform="windows" if "windows" in argv else "linux")
    before = tree(tmp_path)
    runner = FakeRunner()
    code, out, err = run_main(["--dry-run", "--run-as", service_account(), *argv], host=host, runner=runner, checkout=str(checkout))
    assert code == 0, err
    assert runner.calls == [] and tree(tmp_path) == before
    assert out.startswith("# dry run:")
    if "--uninstall" in argv:
        assert "[write]" not in out
    elif "windows" in argv:
        assert "[run] schtasks /Create /TN civitai-daemon /XML" in out and "<ExecutionTimeLimit>PT0S" in out
    else:
        assert "[run] (in %s) uv sync --frozen" % checkout in out
        assert "[write] " in out and "ExecStart=" in out and "[end] " in out


def test_dry_run_shows_the_exact_unit_text(tmp_path):
    checkout = make_checkout(tmp_path)
    host = linux_host(tmp_path)
    code, out, _ = run_main(["--dry-run", "--run-as", service_account()], host=host, runner=FakeRunner(),
                            checkout=str(checkout))
    assert code == 0
    unit_path = Path(host.system_unit_dir) / "civitai-daemon.service"
    shown = out.split(f"[write] {unit_path} (mode 0644, utf-8)\n", 1)[1].split(f"[end] {unit_path}", 1)[0]
    assert run_main(["--run-as", service_account()], host=host, runner=FakeRunner(), checkout=str(checkout))[0] == 0
    assert unit_path.read_text() == shown
    assert "[run] systemctl daemon-reload\n[run] systemctl enable civitai-daemon.service\n" \
           "[run] systemctl restart civitai-daemon.service" in out


# --- Windows ---------------------------------------------------------------------------------------

WIN = Layout("windows", r"C:\civitai", r"C:\civitai\config.json", r"D:\models")


def windows_host(nssm: bool, admin: bool = True) -> Host:
    return Host(platform="windows", environ={"USERDOMAIN": "PC", "USERNAME": "ann"}, is_admin=admin,
                which=lambda name: r"C:\tools\nssm.exe" if nssm and name == "nssm" else None)


def command_lines(steps) -> list[str]:
    return [s.command_line() for s in steps if isinstance(s, install.Run)]


def test_nssm_service_with_restart_and_logs():
    steps = install.windows_steps(WIN, windows_host(nssm=True), False, False, False)
    nssm = r"C:\tools\nssm.exe"
    assert command_lines(steps) == [
        f"{nssm} stop civitai-daemon",
        f"{nssm} remove civitai-daemon confirm",
        rf"{nssm} install civitai-daemon C:\civitai\.venv\Scripts\python.exe C:\civitai\supervisor.py "
        r"--config C:\civitai\config.json",
        rf"{nssm} set civitai-daemon AppDirectory C:\civitai",
        f'{nssm} set civitai-daemon DisplayName "Civitai download daemon"',
        rf'{nssm} set civitai-daemon Description "Civitai download daemon for C:\civitai"',
        f"{nssm} set civitai-daemon Start SERVICE_DELAYED_AUTO_START",
        rf"{nssm} set civitai-daemon AppStdout C:\civitai\data\logs\service.log",
        rf"{nssm} set civitai-daemon AppStderr C:\civitai\data\logs\service.log",
        f"{nssm} set civitai-daemon AppRotateFiles 1",
        f"{nssm} set civitai-daemon AppRotateOnline 1",
        f"{nssm} set civitai-daemon AppRotateBytes 10485760",
        f"{nssm} set civitai-daemon AppEnvironmentExtra PYTHONUNBUFFERED=1",
        f"{nssm} set civitai-daemon AppStopMethodConsole 35000",
        f"{nssm} set civitai-daemon AppExit Default Restart",
        f"{nssm} set civitai-daemon AppExit 78 Exit",
        f"{nssm} set civitai-daemon AppRestartDelay 5000",
        f"{nssm} start civitai-daemon",
    ]
    assert [s for s in steps if isinstance(s, install.Run) and not s.check] == steps[1:3]   # removal may fail
    assert steps[0] == install.MakeDir(r"C:\civitai\data\logs")


def test_task_scheduler_task_at_boot_or_logon():
    steps = install.windows_steps(WIN, windows_host(nssm=False), False, False, False)
    xml_path = r"C:\civitai\data\civitai-daemon.task.xml"
    assert command_lines(steps) == [
        rf"schtasks /Create /TN civitai-daemon /XML {xml_path} /F",
        "schtasks /Run /TN civitai-daemon",
    ]
    write = next(s for s in steps if isinstance(s, install.WriteFile))
    assert write.path == xml_path and write.encoding == "utf-16"
    assert install.RemoveFile(xml_path) in steps                 # the definition file does not stay behind
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    task = ET.fromstring(write.text.encode("utf-16"))
    assert task.find("t:Triggers/t:BootTrigger", ns) is not None
    assert task.findtext("t:Principals/t:Principal/t:LogonType", namespaces=ns) == "S4U"
    assert task.findtext("t:Principals/t:Principal/t:UserId", namespaces=ns) == r"PC\ann"
    assert task.findtext("t:Settings/t:ExecutionTimeLimit", namespaces=ns) == "PT0S"
    assert task.findtext("t:Settings/t:RestartOnFailure/t:Count", namespaces=ns) == "255"
    assert task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=ns) == (
        r'/d /c "C:\civitai\.venv\Scripts\python.exe C:\civitai\supervisor.py --config C:\civitai\config.json'
        r' >> "C:\civitai\data\logs\service.log" 2>&1"')
    assert task.findtext("t:Actions/t:Exec/t:WorkingDirectory", namespaces=ns) == r"C:\civitai"

    # --user: a task at logon, without elevation, even where NSSM is available.
    at_logon = install.windows_steps(WIN, windows_host(nssm=True, admin=False), True, False, False)
    assert command_lines(at_logon)[0].startswith("schtasks /Create")
    task = ET.fromstring(next(s for s in at_logon if isinstance(s, install.WriteFile)).text.encode("utf-16"))
    assert task.findtext("t:Triggers/t:LogonTrigger/t:UserId", namespaces=ns) == r"PC\ann"
    assert task.findtext("t:Principals/t:Principal/t:LogonType", namespaces=ns) == "InteractiveToken"


def test_windows_uninstall_removes_either():
    with_nssm = command_lines(install.windows_steps(WIN, windows_host(nssm=True), False, True, False))
    assert with_nssm == [r"C:\tools\nssm.exe stop civitai-daemon", r"C:\tools\nssm.exe remove civitai-daemon confirm",
                         "schtasks /End /TN civitai-daemon", "schtasks /Delete /TN civitai-daemon /F"]
    without = command_lines(install.windows_steps(WIN, windows_host(nssm=False), False, True, False))
    assert without == ["schtasks /End /TN civitai-daemon", "schtasks /Delete /TN civitai-daemon /F"]


@pytest.mark.parametrize("nssm, user_unit, expected", [
    (True, False, "Installing an NSSM service needs an elevated (administrator) prompt"),
    (False, False, "A task that starts at boot needs an elevated (administrator) prompt"),
])
def test_windows_without_admin_is_one_sentence(nssm, user_unit, expected):
    with pytest.raises(install.InstallError, match=re.escape(expected)):
        install.windows_steps(WIN, windows_host(nssm=nssm, admin=False), user_unit, False, False)
    # ...while a task at logon needs no elevation.
    install.windows_steps(WIN, windows_host(nssm=False, admin=False), True, False, False)


def test_windows_path_with_spaces_is_refused():
    layout = Layout("windows", r"C:\Program Files\civitai", r"C:\Program Files\civitai\config.json", r"D:\m")
    with pytest.raises(install.InstallError, match="contains a space"):
        install.windows_steps(layout, windows_host(nssm=True), False, False, False)


def test_install_py_needs_only_the_standard_library():
    import ast
    import sys

    tree_ = ast.parse(Path(install.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree_) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree_)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
