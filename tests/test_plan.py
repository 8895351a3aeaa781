"""Planning is pure: desired state from the inventory, compared with reported facts."""

import dataclasses
import os

import pytest
import yaml

from fleet import desired, facts, plan
from tests.conftest import REPO, load_inventory, project, write_inventory

SEED = os.path.join(REPO, "inventory", "seed.yaml")


def compile_seed(path=SEED):
    inv = load_inventory(path)
    return inv, desired.compile_services(inv, [inv.service("inference")], project())


def report_matching(state):
    """Facts of a host on which the desired state is fully in place and running."""
    report = facts.Report()
    for spec in state.files:
        report.present[spec.path] = True
        if spec.content is not None:
            report.contents[spec.path] = spec.content
    for i, proc in enumerate(state.processes):
        report.procs[proc.name] = facts.ProcState(proc.name, 100 + i, True, proc.fingerprint)
    return report


def test_seed_compiles_to_backends_and_envoy():
    _, states = compile_seed()
    assert set(states) == {"node109", "node110"}
    assert [p.name for p in states["node109"].processes] == ["inference", "envoy-inference"]
    assert [p.name for p in states["node110"].processes] == ["inference"]
    backend = states["node110"].processes[0]
    assert backend.ports == (7073,)
    assert backend.command == ("python3 /opt/fleet/artifacts/{0}/friesian-services.pyz inference "
                               "-c /opt/fleet/services/inference/config.yaml").format(
        states["node110"].files[0].sha256[:16])
    envoy = states["node109"].processes[1]
    assert envoy.ports == (8083,)  # its admin is a Unix socket
    assert "-c /opt/fleet/envoy/inference/bootstrap.yaml" in envoy.command


def test_envoy_config_lists_every_backend_and_puts_admin_on_a_private_socket():
    _, states = compile_seed()
    (label, static), = states["node109"].envoy_validations
    assert "172.168.3.109" in static and "172.168.3.110" in static
    lds = next(f for f in states["node109"].files if f.path.endswith("lds.yaml")).content.decode()
    assert "port_value: 8083" in lds
    bootstrap = next(f for f in states["node109"].files if f.path.endswith("bootstrap.yaml")).content.decode()
    admin = yaml.safe_load(bootstrap)["admin"]
    assert admin == {"address": {"pipe": {"path": "/opt/fleet/envoy/inference/admin.sock", "mode": 0o600}}}


def test_fresh_host_gets_everything():
    _, states = compile_seed()
    state = states["node109"]
    p = plan.plan_host(state, facts.Report())
    assert p.send == state.files
    assert p.restarts == state.processes
    assert set(p.task_status().values()) == {"changed"}


def test_host_in_place_needs_nothing():
    _, states = compile_seed()
    for state in states.values():
        p = plan.plan_host(state, report_matching(state))
        assert not p.changed
        assert set(p.task_status().values()) == {"ok"}


def test_dead_process_is_restarted_alone():
    _, states = compile_seed()
    state = states["node110"]
    report = report_matching(state)
    report.procs["inference"] = facts.ProcState("inference", 100, False, state.processes[0].fingerprint)
    p = plan.plan_host(state, report)
    assert p.send == [] and [r.name for r in p.restarts] == ["inference"]
    assert p.reasons["inference"] == "not running"


def test_every_host_with_processes_gets_the_supervisor_and_an_unsupervised_process_restarts():
    _, states = compile_seed()
    state = states["node110"]
    supervisor = [f for f in state.files if f.task == desired.SUPERVISOR_TASK]
    assert [f.path for f in supervisor] == [state.supervisor]
    assert state.supervisor == f"/opt/fleet/artifacts/{supervisor[0].sha256[:16]}/supervisor.py"
    report = report_matching(state)
    # Started by an older fleet, without a supervisor: nothing would restart it, so it restarts now.
    fingerprint = state.processes[0].fingerprint
    report.procs["inference"] = facts.ProcState("inference", 100, True, fingerprint, facts.parse_supervision(
        "inference 0"))
    p = plan.plan_host(state, report)
    assert [r.name for r in p.restarts] == ["inference"]
    assert p.reasons["inference"] == "running without fleet's supervisor"
    report.procs["inference"] = facts.ProcState("inference", 100, True, fingerprint, facts.parse_supervision(
        "inference 1 name=inference state=running restarts=2 last_exit=SIGKILL"))
    assert not plan.plan_host(state, report).changed


def test_a_file_changed_on_the_host_is_put_back_and_restarts_what_runs_with_it():
    _, states = compile_seed()
    state = states["node110"]
    report = report_matching(state)
    config = next(f for f in state.files if f.path.endswith("/config.yaml"))
    report.contents[config.path] = b"modelParallelism: edited by hand\n"
    p = plan.plan_host(state, report)
    assert [s.path for s in p.send] == [config.path]
    assert [r.name for r in p.restarts] == ["inference"]
    assert p.reasons["inference"] == "a file it restarts on differs on the host"


def test_config_change_restarts_the_service_with_a_diff(tmp_path):
    _, states = compile_seed()
    old = states["node110"]
    report = report_matching(old)
    text = open(SEED).read().replace("      port: 8083\n", "      port: 8083\n    vars:\n      modelParallelism: 8\n")
    _, new_states = compile_seed(write_text(tmp_path, text))
    p = plan.plan_host(new_states["node110"], report)
    assert [s.path for s in p.send] == ["/opt/fleet/services/inference/config.yaml"]
    assert [r.name for r in p.restarts] == ["inference"]
    (path, diff), = p.diffs
    assert "-modelParallelism: 4" in diff and "+modelParallelism: 8" in diff


def test_backend_change_reaches_envoy_without_a_restart(tmp_path):
    _, states = compile_seed()
    report = report_matching(states["node109"])
    text = open(SEED).read().replace("backends: [node109, node110]", "backends: [node109]")
    _, new_states = compile_seed(write_text(tmp_path, text))
    p = plan.plan_host(new_states["node109"], report)
    assert [os.path.basename(s.path) for s in p.send] == ["cds.yaml"]
    assert p.restarts == []  # Envoy picks up cds.yaml itself; the bootstrap did not change


def test_friesian_jar_deploys_with_java_command(tmp_path):
    jar = tmp_path / "friesian-serving.jar"
    jar.write_bytes(b"PK\x03\x04 not really a jar, only its bytes matter here")
    inv = {
        "hosts": {"a": {"address": "10.9.9.9"}},
        "services": {"inference": {
            "port": 7073, "backends": ["a"], "ingress": {"host": "a", "port": 8083},
            "vars": {
                "artifact": str(jar),
                "command": "java -cp {{ artifact_path }} "
                           "com.intel.analytics.bigdl.friesian.serving.ranking.RankingServer -c {{ config_path }}",
                "modelPath": "/opt/models/ranking",
            }}}}
    loaded = load_inventory(write_inventory(tmp_path, inv))
    states = desired.compile_services(loaded, [loaded.service("inference")], project())
    artifact = states["a"].files[0]
    assert artifact.source == str(jar)
    assert states["a"].processes[0].command == (
        f"java -cp /opt/fleet/artifacts/{artifact.sha256[:16]}/friesian-serving.jar "
        "com.intel.analytics.bigdl.friesian.serving.ranking.RankingServer -c /opt/fleet/services/inference/config.yaml")
    config = states["a"].files[1].content.decode()
    assert "servicePort: 7073" in config and 'modelPath: "/opt/models/ranking"' in config


def write_text(tmp_path, text):
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    return str(path)


def test_restart_on_must_name_an_earlier_task(tmp_path):
    proj = project()
    role = proj.roles["inference"]
    bad_task = role.tasks[2].__class__(name="process", module="process",
                                       args={"name": "x", "command": "true", "restart_on": ["nope"]})
    broken = role.__class__(name="inference", defaults=role.defaults, tasks=(bad_task,))
    proj = dataclasses.replace(proj, roles=dict(proj.roles, inference=broken))
    inv = load_inventory(SEED)
    with pytest.raises(Exception, match="restart_on names no earlier task: nope"):
        desired.compile_services(inv, [inv.service("inference")], proj)


def test_deploy_all_runs_in_dependency_waves():
    inv = load_inventory(SEED)
    waves = desired.deploy_order(inv, list(inv.services.values()), project())
    assert [[s.name for s in wave] for wave in waves] == [
        ["inference", "feature", "feature_2tower"], ["vector_search"], ["recommender"]]


def test_service_urls_point_at_envoy_listeners():
    inv = load_inventory(SEED)
    states = desired.compile_services(inv, [inv.service("recommender")], project())
    config = states["node115"].files[1].content.decode()
    assert 'recallServiceURL: "172.168.3.112:8084"' in config
    assert 'featureServiceURL: "172.168.3.111:8082"' in config
    assert 'rankingServiceURL: "172.168.3.109:8083"' in config
    assert "servicePort: 7950" in config  # this backend's own port


def test_missing_dependency_names_the_service(tmp_path):
    text = open(SEED).read()
    text = text[:text.index("  feature:\n")] + text[text.index("  recommender:\n"):]
    inv = load_inventory(write_text(tmp_path, text))
    with pytest.raises(Exception, match="recommender depends on 'vector_search', which the inventory does not"):
        desired.deploy_order(inv, list(inv.services.values()), project())


def test_dependency_cycle_is_refused(tmp_path):
    text = open(SEED).read().replace("    ingress: {host: node111, port: 8082}",
                                     "    ingress: {host: node111, port: 8082}\n"
                                     "    vars: {depends_on: [recommender]}")
    inv = load_inventory(write_text(tmp_path, text))
    with pytest.raises(Exception, match="cycle: feature, recommender"):
        desired.deploy_order(inv, list(inv.services.values()), project())


def test_shared_files_are_sent_once_per_host():
    inv = load_inventory(SEED)
    states = desired.compile_services(inv, list(inv.services.values()), project())
    paths = [f.path for f in states["node109"].files]
    assert len(paths) == len(set(paths))
    assert sum(p.endswith("/envoy") for p in paths) == 1  # two Envoys on node109, one binary


def test_service_roles_include_the_shared_tasks():
    roles = project().roles
    for name in ("inference", "feature", "feature_2tower", "vector_search", "recommender"):
        assert [t.name for t in roles[name].tasks] == ["artifact", "config", "process"]
        assert roles[name].defaults["artifact"] == "builtin:services"
    assert roles["feature_2tower"].defaults["serviceType"] == "inference"
