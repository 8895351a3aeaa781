"""Changing a live service loses no request (issue 9): inference on three backends behind Envoy,
four long-lived client channels calling through Envoy for the whole of every change."""

import os
import re
import shutil
import zipfile

import yaml

from fleet import artifacts
from tests.conftest import run_fleet, write_inventory
from tests.load import Load

LAB_HOSTS = 5  # h0: Envoy; h1-h3: backends; h4: a backend added later


def inventory(lab, backends=("h1", "h2", "h3"), **vars):
    service = {"port": 7073, "backends": list(backends), "ingress": {"host": "h0", "port": 8083},
               "rollout": {"batch": 1}}
    if vars:
        service["vars"] = vars
    return {"hosts": lab.inventory_hosts(), "services": {"inference": service}}


def deploy_under_load(lab, path):
    with Load(f"{lab.host('h0').address}:8083") as load:
        result = run_fleet("deploy", "inference", "-i", path)
    print(f"\n{os.path.basename(path)}: {load}")
    assert load.sent > 50, load
    return result, load


def pid(lab, host):
    with open(os.path.join(lab.host(host).srv, "fleet", "run", "inference.pid")) as f:
        return int(f.read())


def config(lab, host):
    with open(os.path.join(lab.host(host).srv, "fleet", "services", "inference", "config.yaml")) as f:
        return yaml.safe_load(f)


def test_cold_deploy(lab, tmp_path_factory):
    path = write_inventory(tmp_path_factory.mktemp("cold"), inventory(lab))
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_variable_change_rolls_batch_by_batch_and_loses_nothing(lab, tmp_path):
    before = {h: pid(lab, h) for h in ("h1", "h2", "h3")}
    result, load = deploy_under_load(lab, write_inventory(tmp_path, inventory(lab, modelParallelism=3)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed == 0, load
    # One backend at a time: three batches, each back in rotation before the next.
    assert len(re.findall(r"inference rollout [123]/3 +ok +back in rotation", result.stdout)) == 3
    for host in ("h1", "h2", "h3"):
        assert pid(lab, host) != before[host] and config(lab, host)["modelParallelism"] == 3


def test_a_new_artifact_rolls_and_loses_nothing(lab, tmp_path):
    artifact = tmp_path / "services-v2.pyz"
    shutil.copy(artifacts.resolve("builtin:services", ".").path, artifact)
    with zipfile.ZipFile(artifact, "a") as zf:
        zf.writestr("RELEASE", "v2\n")
    result, load = deploy_under_load(lab, write_inventory(tmp_path, inventory(lab, modelParallelism=3,
                                                                             artifact=str(artifact))))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed == 0, load
    assert "inference.inference.artifact" in result.stdout


def test_adding_a_backend_loses_nothing(lab, tmp_path):
    data = inventory(lab, backends=("h1", "h2", "h3", "h4"), modelParallelism=3)
    result, load = deploy_under_load(lab, write_inventory(tmp_path, data))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed == 0, load
    assert "4/4 backends healthy in Envoy" in result.stdout


def test_removing_a_backend_drains_then_stops_it_and_loses_nothing(lab, tmp_path):
    data = inventory(lab, backends=("h1", "h3", "h4"), modelParallelism=3)
    result, load = deploy_under_load(lab, write_inventory(tmp_path, data))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed == 0, load
    assert re.search(r"│ h2 .*│ 1 ", result.stdout), result.stdout  # one step changed: the stop
    assert "3/3 backends healthy in Envoy" in result.stdout
    assert not os.path.exists(os.path.join(lab.host("h2").srv, "fleet", "run", "inference.pid"))
    assert ":7073 " not in lab.exec("h2", "netstat", "-tnl")
    # Back to four backends for what follows.
    data = inventory(lab, backends=("h1", "h2", "h3", "h4"), modelParallelism=3)
    assert run_fleet("deploy", "inference", "-i", write_inventory(tmp_path, data, "four.yaml")).returncode == 0


def test_a_version_that_never_listens_stops_the_rollout_and_loses_nothing(lab, tmp_path):
    before = {h: pid(lab, h) for h in ("h1", "h2", "h3", "h4")}
    data = inventory(lab, backends=("h1", "h2", "h3", "h4"), modelParallelism=3, command="sleep 300",
                     start_timeout=4)
    result, load = deploy_under_load(lab, write_inventory(tmp_path, data))
    assert result.returncode == 1, result.stdout
    assert load.failed == 0, load
    assert re.search(r"h1 +apply +failed +inference: not listening on port\(s\) 7073 after 4s", result.stdout), \
        result.stdout
    assert "previous version restored and running" in result.stdout
    # h1 serves its previous release again; the later batches were never touched.
    assert config(lab, "h1")["modelParallelism"] == 3
    for host in ("h2", "h3", "h4"):
        assert pid(lab, host) == before[host]
    assert re.search(r"│ h2 .* not restarted: the rollout of inference stopped at batch 1 \(batch 1 failed on h1\)",
                     result.stdout), result.stdout


def test_a_single_backend_changes_behind_a_surge_instance_and_loses_nothing(lab, tmp_path):
    one = write_inventory(tmp_path, inventory(lab, backends=("h1",), modelParallelism=3), "one.yaml")
    result, load = deploy_under_load(lab, one)  # scale in to one backend
    assert result.returncode == 0 and load.failed == 0, result.stdout + str(load)
    before = pid(lab, "h1")
    result, load = deploy_under_load(lab, write_inventory(tmp_path, inventory(lab, backends=("h1",),
                                                                              modelParallelism=2), "two.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed == 0, load
    assert re.search(r"h1 +inference surge +ok +inference-surge stopped", result.stdout), result.stdout
    assert pid(lab, "h1") != before and config(lab, "h1")["modelParallelism"] == 2
    assert ":17073 " not in lab.exec("h1", "netstat", "-tnl")  # the surge instance is gone
