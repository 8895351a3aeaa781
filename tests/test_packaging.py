"""fleet as a Python tool: a normal (not editable) install runs from any directory with its
built-in roles; a project directory overrides them; the tool never loads the workload's code."""

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import yaml

from fleet import project
from fleet.errors import UsageError
from tests.conftest import REPO, planned_artifact, port_shift

# Ports of the install test's stack: shifted away from the embedded default's and from
# tests/test_local_default.py's, so neither ever meets this one.
PORT_SHIFT = port_shift(30000)
CHECKOUT_PARTS = ["fleet", "roles", "templates", "playbooks", "inventory", "services", "pyproject.toml", "README.md"]


def dependency_dirs():
    """Where this interpreter finds fleet's and the services' dependencies, for a .pth in the
    fresh venv: the test installs the two packages, not their dependencies, from no index."""
    dirs = {sysconfig.get_paths()["purelib"]}
    dirs.update(p for p in sys.path if p.endswith("site-packages"))
    return sorted(dirs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with `pip install` of a copy of the checkout (fleet and services, not editable)."""
    base = tmp_path_factory.mktemp("install")
    checkout = base / "checkout"
    checkout.mkdir()
    for part in CHECKOUT_PARTS:
        src = os.path.join(REPO, part)
        if os.path.isdir(src):
            shutil.copytree(src, checkout / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy(src, checkout / part)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w") as f:
        f.write("\n".join(dependency_dirs()) + "\n")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                              "--no-build-isolation", "--no-index", str(checkout), str(checkout / "services")],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(checkout)  # the installed tool must not need the sources
    empty = base / "empty"
    empty.mkdir()
    env = dict(os.environ, HOME=str(base / "home"), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    env.pop("FLEET_INVENTORY", None)
    return venv, empty, env


def fleet(installed, *args, timeout=300):
    venv, empty, env = installed
    return subprocess.run([str(venv / "bin" / "fleet"), *args], capture_output=True, text=True, cwd=empty, env=env,
                          timeout=timeout)


def test_installed_fleet_runs_from_an_empty_directory(installed):
    venv, empty, env = installed
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import fleet; print(fleet.__file__)"],
                           capture_output=True, text=True, cwd=empty, env=env, timeout=60).stdout
    assert where.startswith(str(venv))
    version = fleet(installed, "--version")
    assert version.returncode == 0 and version.stdout.strip() == "fleet 0.1.0"
    # No -i, no project: the embedded local default, its state under ~/.local/state/fleet/local/.
    check = fleet(installed, "deploy", "inference", "--check")
    assert check.returncode == 3, check.stdout + check.stderr
    assert f"{env['HOME']}/.local/state/fleet/local/node1/services/inference/config.yaml" in check.stdout
    assert os.listdir(empty) == []


def test_installed_fleet_deploys_and_stops_a_project(installed):
    venv, empty, env = installed
    proj = empty.parent / "project"
    assert fleet(installed, "init", str(proj)).returncode == 0
    assert "lives under .fleet/ beside this file." in (proj / "inventory.yaml").read_text()
    data = yaml.safe_load((proj / "inventory.yaml").read_text())
    assert [h["root"] for h in data["hosts"].values()] == [".fleet/node1", ".fleet/node2"]
    for service in data["services"].values():
        for ports in (service, service["ingress"]):
            for key in ("port",):
                if key in ports:
                    ports[key] += PORT_SHIFT
    path = proj / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        deploy = fleet(installed, "deploy", "inference", "-i", str(path))
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "inference: 2/2 backends healthy in Envoy" in deploy.stdout
        assert (proj / ".fleet" / "node1" / "run" / "envoy-inference.pid").exists()
        stop = fleet(installed, "stop", "inference", "-i", str(path))
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "node1: envoy-inference stopped" in stop.stdout
    finally:
        for pidfile in (proj / ".fleet").glob("*/run/*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_init_refuses_an_existing_project(installed):
    proj = installed[1].parent / "again"
    assert fleet(installed, "init", str(proj)).returncode == 0
    again = fleet(installed, "init", str(proj))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_project_roles_and_templates_come_first(tmp_path):
    (tmp_path / "roles" / "envoy").mkdir(parents=True)
    (tmp_path / "roles" / "envoy" / "tasks.yaml").write_text(textwrap.dedent("""\
        - name: process
          process: {name: "envoy-{{ service }}", command: "sleep 1000"}
        """))
    (tmp_path / "roles" / "extra").mkdir()
    (tmp_path / "roles" / "extra" / "tasks.yaml").write_text("include: inference\n")
    (tmp_path / "templates" / "common").mkdir(parents=True)
    (tmp_path / "templates" / "common" / "service.yaml.j2").write_text("servicePort: {{ port }}  # ours\n")
    proj = project.load(str(tmp_path), resolve_artifact=planned_artifact)
    assert [t.name for t in proj.roles["envoy"].tasks] == ["process"]  # the project's
    assert [t.name for t in proj.roles["inference"].tasks] == ["artifact", "config", "process"]  # built-in
    assert proj.roles["extra"].tasks == proj.roles["inference"].tasks  # a new role may include a built-in one
    # The built-in inference template, including the project's common part.
    rendered = proj.renderer.file("inference/config.yaml.j2", {"port": 7, "modelPath": "m", "modelParallelism": 2})
    assert rendered == 'servicePort: 7  # ours\n\nmodelPath: "m"\nmodelParallelism: 2\n'


def test_project_without_overrides_is_the_builtin(tmp_path):
    assert project.search_path(str(tmp_path), "roles") == [project.builtin_dir("roles")]
    assert project.default_inventory(str(tmp_path)).endswith(os.path.join("inventory", "local.yaml"))
    (tmp_path / "inventory.yaml").write_text("hosts: {}\n")
    assert project.default_inventory(str(tmp_path)) == str(tmp_path / "inventory.yaml")
    with pytest.raises(UsageError):
        project.init(str(tmp_path))


def test_fleet_never_imports_the_workload():
    """Import every fleet module; none may pull in the services package or its generated protos
    (grpc.health.v1 from grpcio-health-checking is the one proto fleet speaks)."""
    code = textwrap.dedent("""\
        import importlib, pkgutil, sys
        import fleet
        for info in pkgutil.iter_modules(fleet.__path__):
            importlib.import_module("fleet." + info.name)
        print("\\n".join(sorted(sys.modules)))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = result.stdout.split()
    assert "fleet.cli" in modules and "fleet.verify" in modules
    workload = [m for m in modules if m.startswith("friesian_services")
                or (m.endswith("_pb2") or m.endswith("_pb2_grpc")) and not m.startswith(("grpc_health.", "google."))]
    assert workload == []


def test_planning_needs_neither_envoy_nor_the_services():
    """Compiling the whole stack with artifact identities from a resolver (as the planning tests
    do) runs with the envoy and friesian_services packages made unimportable."""
    code = textwrap.dedent("""\
        import sys
        sys.modules["envoy"] = sys.modules["friesian_services"] = None  # import now raises
        from fleet import desired, inventory
        from tests.conftest import REPO, project
        proj = project()
        inv = inventory.load(REPO + "/inventory/seed.yaml", set(proj.roles))
        states = desired.compile_services(inv, list(inv.services.values()), proj)
        print(sorted(f.path.rsplit("/", 1)[1] for s in states.values() for f in s.files if f.content is None))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "'envoy'" in result.stdout and "'friesian-services.pyz'" in result.stdout
