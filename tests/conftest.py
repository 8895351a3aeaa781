import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fleet import artifacts, inventory
from fleet.project import load as load_project
from tests.hostlab import HostLab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def port_shift(base):
    """Ports for a test's loopback stack: base plus 100 per FLEET_LAB_ID, so checkouts testing side
    by side on one machine never bind each other's ports."""
    return base + 100 * (int(os.environ.get("FLEET_LAB_ID") or 0) % 100)


def planned_artifact(src, base_dir, machine=None):
    """Identities for planning tests: built-in artifacts are named, never built or hashed (planning
    must not need the services package or the 107 MB Envoy wheel); files on disk are resolved.
    A machine-specific one has an identity per machine."""
    if src in artifacts.BUILTIN_NAMES:
        which = f"{src} {machine}" if machine and src in artifacts.MACHINE_SPECIFIC else src
        return artifacts.Artifact(path=f"(not built) {which}", sha256=hashlib.sha256(which.encode()).hexdigest(),
                                  name=artifacts.BUILTIN_NAMES[src])
    return artifacts.resolve(src, base_dir)


def project():
    """The built-in roles, templates and playbook, as a pure planning test sees them."""
    return load_project(REPO, resolve_artifact=planned_artifact)


def write_inventory(directory, data, name="inventory.yaml"):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def load_inventory(path):
    return inventory.load(path, set(project().roles))


def run_fleet(*args, timeout=300):
    """The real command line, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def run_smoke(address, *args, timeout=60):
    """The stack's smoke test (beside the services, not in fleet), as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "friesian_services.smoke", address, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def fleet_project():
    return project()


@pytest.fixture(scope="module")
def lab(request):
    """Namespace hosts h0, h1, ... for a test module; its LAB_HOSTS says how many (default 2).
    Creation failures raise: the tests stop, nothing else is contacted."""
    with HostLab(getattr(request.module, "LAB_HOSTS", 2)) as lab:
        yield lab


def inference_inventory(lab, **overrides):
    """inference on backends h0 and h1, Envoy on h0 (8083), as inventory data."""
    service = {"port": 7073, "backends": ["h0", "h1"], "ingress": {"host": "h0", "port": 8083}}
    service.update(overrides)
    return {"hosts": lab.inventory_hosts(), "services": {"inference": service}}


def kill_unsupervised(lab, host, name, root="fleet"):
    """A process that stays down: its supervisor killed with SIGKILL (as by the OOM killer),
    which takes the process along (PR_SET_PDEATHSIG); a plain kill -9 of the process would be
    restarted by the supervisor within seconds. Returns once the process is gone (bounded)."""
    run = os.path.join(lab.host(host).srv, root, "run")
    with open(os.path.join(run, f"{name}.pid")) as f:
        pid = int(f.read())
    with open(os.path.join(run, f"{name}.sup")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, f"{name} on {host} outlived its supervisor"
        time.sleep(0.05)


def alive(pid):
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def open_files(pid):
    """What the descriptors of pid point to now (one closed while they are listed is left out:
    the supervisor closes the pipe that told `start` it was up)."""
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def deployed(tmp_path_factory, data):
    """A module's starting point: `data` written as an inventory and deployed (exit 0); its path."""
    path = write_inventory(tmp_path_factory.mktemp("base"), data)
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 0, result.stdout + result.stderr
    return path
