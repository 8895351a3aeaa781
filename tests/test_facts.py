"""Parsing host reports, netstat and ss listener tables, and Envoy's /clusters output."""

import base64

import pytest

from fleet import facts, verify
from fleet.desired import HostState, ProcessSpec

NETSTAT = """\
Active Internet connections (only servers)
Proto Recv-Q Send-Q Local Address           Foreign Address         State       PID/Program name
tcp        0      0 10.213.56.10:22         0.0.0.0:*               LISTEN      6102/sshd: /usr/sbi
tcp        0      0 0.0.0.0:8083            0.0.0.0:*               LISTEN      6667/envoy
tcp        0      0 127.0.0.1:9090          0.0.0.0:*               LISTEN      6667/envoy
tcp6       0      0 :::7073                 :::*                    LISTEN      6659/python3
"""

SS = """\
State  Recv-Q Send-Q Local Address:Port  Peer Address:PortProcess
LISTEN 0      4096         0.0.0.0:8083       0.0.0.0:*    users:(("envoy",pid=6667,fd=30))
LISTEN 0      4096               *:7073             *:*    users:(("python3",pid=6659,fd=9))
"""


def test_netstat_listeners():
    found = facts.parse_listeners(NETSTAT.splitlines())
    assert [(l.port, l.pid, l.program) for l in found] == [
        (22, 6102, "sshd: /usr/sbi"), (8083, 6667, "envoy"), (9090, 6667, "envoy"), (7073, 6659, "python3")]


def test_ss_listeners():
    found = facts.parse_listeners(SS.splitlines())
    assert [(l.port, l.pid, l.program) for l in found] == [(8083, 6667, "envoy"), (7073, 6659, "python3")]


def test_report_round_trip():
    content = b"servicePort: 7073\n"
    text = "\n".join([
        "noise from a login shell",
        "@@file present /srv/a/envoy",
        "@@file absent /srv/a/x.pyz",
        "@@content /srv/a/config.yaml", base64.b64encode(content).decode(), "@@end",
        "@@proc inference 6659 1 abcd",
        "@@proc envoy-inference - 0 -",
        "@@step inference.inference.config changed",
        "@@fail inference exited before listening",
        "@@log inference", "Traceback ...", "OSError: boom", "@@end",
        "@@netstat", *NETSTAT.splitlines(), "@@end",
    ])
    report = facts.parse(text)
    assert report.present == {"/srv/a/envoy": True, "/srv/a/x.pyz": False, "/srv/a/config.yaml": True}
    assert report.contents["/srv/a/config.yaml"] == content
    assert report.procs["inference"] == facts.ProcState("inference", 6659, True, "abcd")
    assert report.procs["envoy-inference"] == facts.ProcState("envoy-inference", None, False, None)
    assert report.steps == [("inference.inference.config", "changed")]
    assert report.failures == [("inference", "exited before listening")]
    assert report.logs["inference"] == "Traceback ...\nOSError: boom"
    assert len(report.listeners) == 4


def test_supervised_processes_report_restarts_and_last_exit():
    report = facts.parse("\n".join([
        "@@proc inference 6659 1 abcd",
        "@@supervised inference 1 name=inference state=running supervisor=6650 pid=6659 restarts=2 "
        "last_exit=SIGKILL last_exit_at=2026-11-28T00:41:04Z started_at=2026-11-28T00:41:05Z delay=0",
        "@@proc crashing - 0 abcd",
        "@@supervised crashing 1 name=crashing state=backoff supervisor=7000 pid=- restarts=5 last_exit=exit:1 "
        "delay=16",
        "@@proc orphaned - 0 abcd",  # its supervisor killed: the state file still says running
        "@@supervised orphaned 0 name=orphaned state=running supervisor=7100 pid=7101 restarts=0 last_exit=-",
        "@@proc stopped - 0 -",
        "@@supervised stopped 0 name=stopped state=stopped restarts=0 last_exit=exit:0",
        "@@proc old 6000 1 abcd",  # an older fleet's process: no supervisor, no state file
        "@@supervised old 0 ",
        "@@proc older 6001 1 abcd",  # an older fleet's report: no @@supervised line
    ]))
    procs = report.procs
    assert procs["inference"].supervision == facts.Supervision("running", 2, "SIGKILL")
    assert procs["crashing"].supervision == facts.Supervision("backoff", 5, "exit:1")
    assert procs["orphaned"].supervision == facts.Supervision("dead", 0, None)
    assert procs["old"].supervision == facts.Supervision("absent", 0, None)
    assert not procs["old"].supervision.supervised and procs["inference"].supervision.supervised
    assert procs["older"].supervision is None
    assert {name: facts.process_state(p) for name, p in procs.items()} == {
        "inference": "running", "crashing": "backoff", "orphaned": "dead", "stopped": "stopped", "old": "running",
        "older": "running"}
    assert facts.process_state(None) == "not started"


def test_port_checks_want_the_recorded_pid():
    state = HostState(host=None, processes=[
        ProcessSpec("inference", "t", "cmd", "fp", (7073,), 20),
        ProcessSpec("envoy-inference", "t", "cmd", "fp", (8083, 9090), 20),
    ])
    report = facts.parse("\n".join(["@@proc inference 6659 1 fp", "@@proc envoy-inference 7000 1 fp",
                                    "@@netstat", *NETSTAT.splitlines(), "@@end"]))
    checks = {(c.process, c.port): c for c in verify.check_ports(state, report)}
    assert checks[("inference", 7073)].ok
    bad = checks[("envoy-inference", 8083)]
    assert not bad.ok and "held by envoy pid 6667, not envoy-inference pid 7000" in bad.detail


CLUSTERS = """\
inference_service::observability_name::inference_service
inference_service::default_priority::max_connections::1024
inference_service::10.213.56.10:7073::cx_active::1
inference_service::10.213.56.10:7073::rq_total::12
inference_service::10.213.56.10:7073::health_flags::healthy
inference_service::10.213.56.11:7073::rq_total::11
inference_service::10.213.56.11:7073::health_flags::/failed_active_hc
other::10.0.0.1:1::health_flags::healthy
"""


def test_envoy_clusters_view():
    endpoints = verify.parse_clusters(CLUSTERS, "inference_service")
    assert [(e.address, e.healthy, e.rq_total) for e in endpoints] == [
        ("10.213.56.10:7073", True, 12), ("10.213.56.11:7073", False, 11)]
    assert endpoints[1].health_flags == "/failed_active_hc"


@pytest.mark.parametrize("line, state, restarts, last_exit, keeper", [
    # fleet's supervisor (ROOT/run/NAME.state) and a systemd unit (procstate's unitstate) say the same things
    ("inference 1 name=inference state=running supervisor=812 pid=813 restarts=2 last_exit=SIGKILL",
     "running", 2, "SIGKILL", "fleet"),
    ("inference 1 state=running supervisor=systemd unit=fleet-inference-9b69a74c.service restarts=1 "
     "last_exit=SIGKILL last_exit_at=2026-11-28T03:31:35Z", "running", 1, "SIGKILL", "systemd"),
    ("inference 1 state=backoff supervisor=systemd unit=u restarts=7 last_exit=exit:1 last_exit_at=-",
     "backoff", 7, "exit:1", "systemd"),
    ("inference 0 state=stopped supervisor=systemd unit=u restarts=0 last_exit=exit:0 last_exit_at=-",
     "stopped", 0, "exit:0", "systemd"),
    ("inference 0 state=dead supervisor=systemd unit=u restarts=0 last_exit=- last_exit_at=-",
     "dead", 0, None, "systemd"),
    ("inference 0 ", "absent", 0, None, "fleet"),
])
def test_supervision_lines_of_the_supervisor_and_of_a_unit(line, state, restarts, last_exit, keeper):
    supervision = facts.parse_supervision(line)
    assert (supervision.state, supervision.restarts, supervision.last_exit, supervision.keeper) == (
        state, restarts, last_exit, keeper)


def test_the_facts_step_reports_each_services_current_release():
    """An unchanged deploy records no release where every service has one: the facts say which."""
    report = facts.parse("@@current inference 1795836633-14844\n@@current recommender 1795836000-1\n")
    assert report.releases == {"inference": "1795836633-14844", "recommender": "1795836000-1"}
    assert facts.parse("").releases == {}
