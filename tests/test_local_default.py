"""The embedded default inventory (local connection, loopback "hosts") runs the whole stack.

Run on shifted ports and its own state directory so it never meets an operator's own deploy."""

import os
import re
import signal

import pytest
import yaml

from tests.conftest import REPO, port_shift, run_fleet, run_smoke

PORT_SHIFT = port_shift(10000)


@pytest.fixture
def local_inventory(tmp_path):
    with open(os.path.join(REPO, "inventory", "local.yaml")) as f:
        data = yaml.safe_load(f)
    for name, host in data["hosts"].items():
        host["root"] = str(tmp_path / name)
    for service in data["services"].values():
        service["port"] += PORT_SHIFT
        service["ingress"]["port"] += PORT_SHIFT
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(data))
    yield str(path)
    run_fleet("stop", "all", "-i", str(path))
    for name in data["hosts"]:  # whatever stop could not reach, by the pids fleet recorded
        run = tmp_path / name / "run"
        for pidfile in run.glob("*.pid") if run.is_dir() else []:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_local_default_runs_the_whole_stack(local_inventory):
    result = run_fleet("deploy", "all", "-i", local_inventory, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(re.findall(r"✓ \w+: 2/2 backends healthy in Envoy", result.stdout)) == 5
    smoke = run_smoke(f"127.0.0.1:{8980 + PORT_SHIFT}", "--users", "3,4", "--num", "4", "--candidates", "20",
                      "--reference")
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert f"recommendations through 127.0.0.1:{8980 + PORT_SHIFT}" in smoke.stdout
    again = run_fleet("deploy", "all", "-i", local_inventory)
    assert again.returncode == 0 and "no changes" in again.stdout
