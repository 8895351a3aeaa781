"""Unit files: the quoting of every value (pure), and systemd's own parser on rendered units
(`systemd-analyze verify`, Debian package systemd): it must accept them without a warning."""

import os
import subprocess
import sys

import pytest

from fleet import commands, desired, systemd
from tests.conftest import REPO, load_inventory, project

HOSTILE = ['a b', 'say "hi"', "it's", "$HOME", "${PATH}", "100%", "%n", "back\\slash", ";", "tail\\"]


def verify(tmp_path, text, name="fleet-test.service"):
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    return proc.returncode, proc.stderr.strip()


@pytest.mark.parametrize("value, exec_word, environment", [
    ("plain", '"plain"', '"plain"'),
    ("a b", '"a b"', '"a b"'),
    ('say "hi"', r'"say \"hi\""', r'"say \"hi\""'),
    ("back\\slash", r'"back\\slash"', r'"back\\slash"'),
    ("$HOME", '"$$HOME"', '"$HOME"'),  # $VAR expands on Exec lines only
    ("100%", '"100%%"', '"100%%"'),
    (";", "\\;", '";"'),
])
def test_quote_word(value, exec_word, environment):
    assert systemd.quote_word(value, exec_line=True) == exec_word
    assert systemd.quote_word(value) == environment


@pytest.mark.parametrize("value", ["two\nlines", "cr\r", "nul\0", "tab\t", "bell\x07"])
def test_newlines_and_control_characters_are_refused(value):
    with pytest.raises(systemd.UnitError, match="newlines and control characters"):
        systemd.quote_word(value)
    with pytest.raises(systemd.UnitError):
        systemd.render_unit("/srv/fleet", "svc", ["/bin/sh", "-c", value])


@pytest.mark.parametrize("root, name, command, kwargs, message", [
    ("srv/fleet", "svc", ["/bin/sh"], {}, "root: expected an absolute path"),
    ("/srv/my fleet", "svc", ["/bin/sh"], {}, "spaces, quotes and backslashes"),
    ("/srv/fleet", "svc@1", ["/bin/sh"], {}, "process name"),
    ("/srv/fleet", "../svc", ["/bin/sh"], {}, "process name"),
    ("/srv/fleet", "svc", [], {}, "command: expected at least an executable"),
    ("/srv/fleet", "svc", ["python3"], {}, "executable: expected an absolute path"),
    ("/srv/fleet", "svc", ["-/bin/sh"], {}, "executable: expected an absolute path"),
    ("/srv/fleet", "svc", ["/bin/sh"], {"user": "root; rm"}, "user: expected a user name"),
    ("/srv/fleet", "svc", ["/bin/sh"], {"grace": 0}, "grace: expected seconds"),
    ("/srv/fleet", "svc", ["/bin/sh"], {"environment": {"A B": "x"}}, "environment: bad variable name"),
    ("/srv/fleet", "svc", ["/bin/sh"], {"environment": {"FLEET_PROC": "/x"}}, "environment: bad variable name"),
])
def test_values_a_unit_cannot_carry_are_refused(root, name, command, kwargs, message):
    with pytest.raises(systemd.UnitError, match=message):
        systemd.render_unit(root, name, command, **kwargs)


def test_a_rendered_unit_has_the_supervisors_contract():
    text = systemd.render_unit("/srv/fleet", "inference", [sys.executable, "-m", "fleet.services", "inference"],
                               user="fleet", grace=12)
    lines = text.splitlines()
    for line in ["Type=exec", "WorkingDirectory=/srv/fleet", 'Environment="FLEET_PROC=/srv/fleet/inference"',
                 "StandardOutput=append:/srv/fleet/log/inference.log", "Restart=always", "RestartSec=1",
                 "KillSignal=SIGTERM", "TimeoutStopSec=12", "User=fleet", "StartLimitIntervalSec=0",
                 "WantedBy=multi-user.target"]:
        assert line in lines
    assert f'ExecStart="{sys.executable}" "-m" "fleet.services" "inference"' in lines
    # The files fleet's host scripts read, whoever keeps the process: the pid while it runs, how it last ended.
    assert 'ExecStartPost="/bin/sh" "-c" "echo \\"$$MAINPID\\" > \\"$$1\\"" "sh" "/srv/fleet/run/inference.pid"' in lines
    assert ('ExecStopPost="/bin/sh" "-c" "rm -f \\"$$1\\"; echo \\"$$SERVICE_RESULT $$EXIT_CODE $$EXIT_STATUS '
            '$$(date -u +%%Y-%%m-%%dT%%H:%%M:%%SZ)\\" > \\"$$2\\"" "sh" "/srv/fleet/run/inference.pid" '
            '"/srv/fleet/run/inference.exit"') in lines


def test_the_host_scripts_name_units_as_fleet_does(tmp_path):
    """The prelude's `unit` (what start/stop/status ask systemctl about) and systemd.unit_name
    agree, for an ordinary and a hostile root."""
    for root in ["/srv/fleet", "/srv/my fleet $(x) 'q\" ;"]:
        script = tmp_path / "unit.sh"
        script.write_text(commands.prelude(root) + "unit inference\n")
        out = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=10)
        assert out.stdout == systemd.unit_name(root, "inference") + "\n", out.stderr


def test_systemd_accepts_units_with_hostile_values_without_a_warning(tmp_path):
    text = systemd.render_unit("/srv/fleet%x", "svc", ["/bin/sh", "-c", 'exec "$0" "$@"', *HOSTILE],
                               environment={f"V{i}": value for i, value in enumerate(HOSTILE)}, user="fleet",
                               grace=7.5)
    assert verify(tmp_path, text) == (0, "")


def test_systemd_analyze_catches_what_the_quoting_prevents(tmp_path):
    """The check above has teeth: the same values written without quoting draw an error."""
    rendered = systemd.render_unit("/srv/fleet", "svc", ["/bin/sh", "-c", "true", 'say "hi'])
    naive = rendered.replace(systemd.quote_word('say "hi', exec_line=True), '"say "hi"')
    code, errors = verify(tmp_path, naive)
    assert code != 0 and "Unbalanced quoting" in errors


def test_unit_names_tell_roots_apart():
    a, b = systemd.unit_name("/srv/a", "inference"), systemd.unit_name("/srv/b", "inference")
    assert a != b and a.startswith("fleet-inference-") and a.endswith(".service")


def test_units_for_fleets_own_processes_pass_systemd_analyze(tmp_path):
    """The units desired renders for every process of the seed inventory (ROOT/units/NAME.service,
    what start_proc installs where the host runs systemd): each runs the process as the
    supervisor runs it (`sh -c 'exec COMMAND'`, the stop grace), restarts it when it changes,
    and passes systemd-analyze. Envoy has none (hot_restart: its epochs are the supervisor's job)."""
    inv = load_inventory(os.path.join(REPO, "inventory", "seed.yaml"))
    states = desired.compile_services(inv, list(inv.services.values()), project())
    processes = [(state, p) for state in states.values() for p in state.processes]
    assert {p.name for _, p in processes} >= {"inference", "envoy-inference"}
    for state, process in processes:
        root = state.host.root
        path = f"{root}/units/{process.name}.service"
        units = [f for f in state.files if f.path == path]
        if process.hot_restart:
            assert units == [] and path not in process.files
            continue
        (spec,) = units
        assert spec.content.decode() == systemd.process_unit(root, process.name, process.command,
                                                             commands.STOP_GRACE_SECONDS)
        assert path in process.files and spec.mode == 0o600
        unit = systemd.unit_name(root, process.name)
        assert verify(tmp_path, spec.content.decode(), name=unit) == (0, ""), unit


def test_a_root_no_unit_can_carry_keeps_its_processes_under_the_supervisor():
    """systemd's path settings take no space or quote: such a root gets no unit, and its
    processes run under fleet's supervisor on any host."""
    assert desired._unit_file("/srv/my fleet", "t", "inference", "/bin/true") is None
    assert desired._unit_file("/srv/fleet", "t", "inference", "/bin/true").path == "/srv/fleet/units/inference.service"
