"""The Task Scheduler definition install.py writes, held against the rules of Microsoft's task
schema (v1.2, learn.microsoft.com/windows/win32/taskschd/task-scheduler-schema): which elements a
Task may hold and which it needs, their order where the schema has a sequence, and the ranges of
the values (RestartOnFailure's Count is an unsignedByte, 1..255; Interval PT1M..P31D). schtasks
refuses a file that breaks them, and there is no Windows here to ask, so this checks them."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

import install
from tests.unit.test_install import WIN, windows_host

NS = "{http://schemas.microsoft.com/windows/2004/02/mit/task}"
DURATION = re.compile(r"^P(?=\d|T\d)(\d+Y)?(\d+M)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?$")
BOOL = {"true", "false"}
TASK_CHILDREN = {"RegistrationInfo", "Triggers", "Settings", "Data", "Principals", "Actions"}
SETTINGS = {"AllowStartOnDemand": BOOL, "RestartOnFailure": None, "MultipleInstancesPolicy":
            {"Parallel", "Queue", "IgnoreNew", "StopExisting"}, "DisallowStartIfOnBatteries": BOOL,
            "StopIfGoingOnBatteries": BOOL, "AllowHardTerminate": BOOL, "StartWhenAvailable": BOOL,
            "NetworkProfileName": None, "RunOnlyIfNetworkAvailable": BOOL, "WakeToRun": BOOL, "Enabled": BOOL,
            "Hidden": BOOL, "DeleteExpiredTaskAfter": "duration", "IdleSettings": None, "NetworkSettings": None,
            "ExecutionTimeLimit": "duration", "Priority": "priority", "RunOnlyIfIdle": BOOL,
            "UseUnifiedSchedulingEngine": BOOL, "DisallowStartOnRemoteAppSession": BOOL}
PRINCIPAL = {"UserId", "LogonType", "GroupId", "DisplayName", "RunLevel", "ProcessTokenSidType",
             "RequiredPrivileges"}
LOGON_TYPES = {"S4U", "Password", "InteractiveToken", "InteractiveTokenOrPassword"}
TRIGGER_CHILDREN = {"Enabled", "StartBoundary", "EndBoundary", "ExecutionTimeLimit", "Repetition", "Delay",
                    "UserId", "id"}


def local(el) -> str:
    return el.tag.replace(NS, "")


def duration_seconds(text: str) -> float:
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", text)
    assert m, text
    d, h, mi, s = (int(x or 0) for x in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


def check_task(text: str) -> None:
    task = ET.fromstring(text.encode("utf-16"))
    assert task.tag == NS + "Task" and task.get("version") in ("1.2", "1.3", "1.4")
    names = [local(c) for c in task]
    assert set(names) <= TASK_CHILDREN and len(names) == len(set(names)), names
    assert "Actions" in names, "Actions is the one element a Task must have"
    principals = task.find(NS + "Principals")
    ids = set()
    if principals is not None:
        assert len(principals) == 1 and local(principals[0]) == "Principal"
        principal = principals[0]
        ids.add(principal.get("id"))
        assert {local(c) for c in principal} <= PRINCIPAL
        logon = principal.findtext(NS + "LogonType")
        assert logon is None or logon in LOGON_TYPES, logon
        assert principal.findtext(NS + "RunLevel") in (None, "LeastPrivilege", "HighestAvailable")
    actions = task.find(NS + "Actions")
    assert actions.get("Context") is None or actions.get("Context") in ids, "Context names a Principal id"
    assert 1 <= len(actions) <= 32
    for action in actions:
        assert local(action) in ("Exec", "ComHandler", "SendEmail", "ShowMessage")
        if local(action) == "Exec":
            order = [local(c) for c in action]
            assert order[0] == "Command" and order == [n for n in ("Command", "Arguments", "WorkingDirectory")
                                                       if n in order], order
            assert action.findtext(NS + "Command").strip()
    triggers = task.find(NS + "Triggers")
    for trigger in triggers if triggers is not None else ():
        assert local(trigger) in ("BootTrigger", "LogonTrigger", "TimeTrigger", "CalendarTrigger", "IdleTrigger",
                                  "RegistrationTrigger", "EventTrigger", "SessionStateChangeTrigger")
        assert {local(c) for c in trigger} <= TRIGGER_CHILDREN | {"Subscription", "ValueQueries",
                                                                  "StateChange", "ScheduleByDay"}
        if trigger.findtext(NS + "Enabled") is not None:
            assert trigger.findtext(NS + "Enabled") in BOOL
        if trigger.findtext(NS + "Delay") is not None:
            assert DURATION.match(trigger.findtext(NS + "Delay"))
    settings = task.find(NS + "Settings")
    for el in settings if settings is not None else ():
        name = local(el)
        assert name in SETTINGS, name
        rule = SETTINGS[name]
        if isinstance(rule, set):
            assert el.text in rule, (name, el.text)
        elif rule == "duration":
            assert DURATION.match(el.text), (name, el.text)
        elif rule == "priority":
            assert 0 <= int(el.text) <= 10
    restart = settings.find(NS + "RestartOnFailure") if settings is not None else None
    if restart is not None:
        assert {local(c) for c in restart} == {"Interval", "Count"}, "both are required"
        assert 60 <= duration_seconds(restart.findtext(NS + "Interval")) <= 31 * 86400
        assert 1 <= int(restart.findtext(NS + "Count")) <= 255, "Count is an unsignedByte"


@pytest.mark.parametrize("user_unit, admin", [(False, True), (True, False)])
def test_the_task_definition_keeps_the_task_schema(user_unit, admin):
    steps = install.windows_steps(WIN, windows_host(nssm=False, admin=admin), user_unit, False, False)
    write = next(s for s in steps if isinstance(s, install.WriteFile))
    check_task(write.text)


def test_the_checker_refuses_what_schtasks_refuses():
    steps = install.windows_steps(WIN, windows_host(nssm=False), False, False, False)
    good = next(s for s in steps if isinstance(s, install.WriteFile)).text
    for bad in (good.replace("<Count>255</Count>", "<Count>999</Count>"),
                good.replace("<Interval>PT1M</Interval>", "<Interval>PT30S</Interval>"),
                re.sub(r"<Actions.*</Actions>", "", good, flags=re.S),
                good.replace("<LogonType>S4U</LogonType>", "<LogonType>Service</LogonType>"),
                good.replace("<ExecutionTimeLimit>PT0S</ExecutionTimeLimit>",
                             "<ExecutionTimeLimit>forever</ExecutionTimeLimit>")):
        with pytest.raises(AssertionError):
            check_task(bad)
