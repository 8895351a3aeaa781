"""Hostile names and values in the inventory (issue 8, findings 2, 5 and 9), all pure: names are
refused, paths stay under root, values cannot add config keys, secrets are data, and addresses
are IP literals or host names."""


import pytest
import yaml

from fleet import desired, validate
from fleet.errors import UsageError
from tests.conftest import load_inventory, project, write_inventory


def service_inventory(role="inference", service_vars=None, ingress_vars=None, hosts=None, **service):
    spec = {"role": role, "port": 7073, "backends": ["a", "b"],
            "ingress": {"host": "a", "port": 8083, "vars": ingress_vars or {}},
            "vars": service_vars or {}}
    spec.update(service)
    hosts = hosts or {"a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.2"}}
    return {"hosts": hosts, "services": {"svc": spec}}


def compiled(tmp_path, data, proj=None):
    inv = load_inventory(write_inventory(tmp_path, data))
    return inv, desired.compile_services(inv, list(inv.services.values()), proj or project())


def refused(tmp_path, data, proj=None):
    with pytest.raises(UsageError) as info:
        compiled(tmp_path, data, proj)
    assert "\n" not in info.value.one_line()
    return info.value


def file_named(state, suffix):
    return next(f for f in state.files if f.path.endswith(suffix))


# -- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x$(touch /srv/PWNED)", "../../PWNDIR", ".hidden", "a b", "-x", "a/b", ""])
def test_bad_service_names_are_refused(tmp_path, name):
    data = service_inventory()
    data["services"] = {name: data["services"]["svc"]}
    err = refused(tmp_path, data)
    assert err.key == f"services.{name}" and "is not a valid name" in err.message


@pytest.mark.parametrize("name", ["h$(id)", "..", "h\nx", "h\n"])
def test_bad_host_names_are_refused(tmp_path, name):
    data = service_inventory(hosts={"a": {"address": "10.0.0.1"}, name: {"address": "10.0.0.2"}})
    err = refused(tmp_path, data)
    assert err.key == f"hosts.{name if name.isprintable() else repr(name)}" and "is not a valid name" in err.message


def with_task(proj, role_name, task_name, **args):
    """proj with one task of a role replaced by one with the given arguments."""
    role = proj.roles[role_name]
    tasks = tuple(t.__class__(name=t.name, module=t.module, args=dict(t.args, **args)) if t.name == task_name else t
                  for t in role.tasks)
    proj.roles[role_name] = role.__class__(name=role.name, defaults=role.defaults, tasks=tasks)
    return proj


def test_bad_process_name_from_role_vars_is_refused(tmp_path):
    proj = with_task(project(), "inference", "process", name="{{ proc }}")
    err = refused(tmp_path, service_inventory(service_vars={"proc": "p; rm -rf /"}), proj)
    assert (err.path, err.key) == ("roles/inference/tasks.yaml", "process")
    assert "process name 'p; rm -rf /' is not a valid name" in err.message


# -- root and paths ------------------------------------------------------------------------------

def test_root_may_hold_spaces_and_commands_quote_it(tmp_path):
    hosts = {"a": {"address": "10.0.0.1", "root": "/srv/my fleet"}, "b": {"address": "10.0.0.2"}}
    _, states = compiled(tmp_path, service_inventory(hosts=hosts))
    backend, envoy = states["a"].processes
    artifact = states["a"].files[0].path
    assert artifact.startswith("/srv/my fleet/artifacts/")
    assert backend.command == f"python3 '{artifact}' inference -c '/srv/my fleet/services/svc/config.yaml'"
    assert " -c '/srv/my fleet/envoy/svc/bootstrap.yaml' " in envoy.command


@pytest.mark.parametrize("root, words", [
    ("/srv/../etc", "normalised"), ("/srv/fleet/", "normalised"), ("/srv//fleet", "normalised"),
    ("/srv/a\nb", "control characters"), ("/srv/\x00", "control characters"), ("srv", "absolute"),
])
def test_bad_roots_are_refused(tmp_path, root, words):
    hosts = {"a": {"address": "10.0.0.1", "root": root}, "b": {"address": "10.0.0.2"}}
    err = refused(tmp_path, service_inventory(hosts=hosts))
    assert err.key == "hosts.a.root" and words in err.message


@pytest.mark.parametrize("task, arg, value", [
    ("config", "dest", "{{ where }}/config.yaml"),
    ("config", "dest", "/etc/{{ where }}"),
])
def test_template_dest_must_stay_under_root(tmp_path, task, arg, value):
    proj = with_task(project(), "inference", task, **{arg: value})
    err = refused(tmp_path, service_inventory(service_vars={"where": "../../etc"}), proj)
    assert (err.path, err.key) == ("roles/inference/tasks.yaml", task) and "leaves the host's root" in err.message


def test_envoy_dir_must_stay_under_root(tmp_path):
    proj = with_task(project(), "envoy", "config", dir="{{ where }}")
    err = refused(tmp_path, service_inventory(ingress_vars={"where": "../.."}), proj)
    assert (err.path, err.key) == ("roles/envoy/tasks.yaml", "config") and "leaves the host's root" in err.message


# -- values into configs -------------------------------------------------------------------------

def config_of(states, host="a"):
    return yaml.safe_load(file_named(states[host], "/config.yaml").content)


def test_a_newline_cannot_add_config_keys(tmp_path):
    _, states = compiled(tmp_path, service_inventory(service_vars={"modelPath": "x\nservicePort: 7999"}))
    config = config_of(states)
    assert config["modelPath"] == "x\nservicePort: 7999"
    assert config["servicePort"] == 7073


@pytest.mark.parametrize("value", ['redis://:p"w@h:6379', "a: b", "{x: 1}", "'", "\\", "- x", "#", "\u2028", "é"])
def test_any_string_round_trips_through_a_config(tmp_path, value):
    _, states = compiled(tmp_path, service_inventory(role="feature", service_vars={"redisUrl": value,
                                                                                    "redisKeyPrefix": value}))
    config = config_of(states)
    assert (config["redisUrl"], config["redisKeyPrefix"], config["servicePort"]) == (value, value, 7073)


def test_numbers_and_booleans_keep_their_type(tmp_path):
    _, states = compiled(tmp_path, service_inventory(role="vector_search", service_vars={
        "getFeatureFromFeatureService": False, "monitorPort": 9100, "feature_service": "svc"}))
    config = config_of(states)
    assert (config["getFeatureFromFeatureService"], config["monitorPort"]) == (False, 9100)


# -- secrets are data ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["secret", "env"])
def test_a_secret_is_never_rendered_as_a_template(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("FLEET_TEST_SECRET", "{{ 7*7 }}")
    value = {"secret": "{{ 7*7 }}"} if kind == "secret" else {"env": "FLEET_TEST_SECRET"}
    inv, states = compiled(tmp_path, service_inventory(service_vars={"modelPath": value}))
    spec = file_named(states["a"], "/config.yaml")
    assert yaml.safe_load(spec.content)["modelPath"] == "{{ 7*7 }}"
    assert (spec.mode, spec.secret) == (0o600, True)
    assert "{{ 7*7 }}" not in inv.mask(spec.content.decode())


def test_a_secret_used_through_another_variable_stays_data(tmp_path):
    inv, states = compiled(tmp_path, service_inventory(role="feature", service_vars={
        "password": {"secret": "{{ 6*7 }}"}, "redisUrl": "redis://:{{ password }}@h:6379"}))
    spec = file_named(states["a"], "/config.yaml")
    assert yaml.safe_load(spec.content)["redisUrl"] == "redis://:{{ 6*7 }}@h:6379"
    assert spec.secret and "6*7" not in inv.mask(spec.content.decode())


def test_a_secret_with_quotes_is_masked_in_its_quoted_form(tmp_path):
    inv, states = compiled(tmp_path, service_inventory(role="feature", service_vars={
        "redisKeyPrefix": {"secret": 'Top"Secret\\PW'}}))
    spec = file_named(states["a"], "/config.yaml")
    assert yaml.safe_load(spec.content)["redisKeyPrefix"] == 'Top"Secret\\PW'
    assert spec.secret and "Secret" not in inv.mask(spec.content.decode())


def test_a_secret_in_ingress_vars_makes_the_envoy_file_private(tmp_path):
    inv, states = compiled(tmp_path, service_inventory(ingress_vars={"connect_timeout": {"secret": "4.321s"}}))
    cds = file_named(states["a"], "/envoy/svc/cds.yaml")
    assert b"connect_timeout: 4.321s" in cds.content
    assert (cds.mode, cds.secret) == (0o600, True)
    assert "4.321s" not in inv.mask(cds.content.decode())
    lds = file_named(states["a"], "/envoy/svc/lds.yaml")
    assert (lds.mode, lds.secret) == (0o644, False)


def test_inventory_templates_are_sandboxed(tmp_path):
    err = refused(tmp_path, service_inventory(service_vars={"modelPath": "{{ ''.__class__.__mro__ }}"}))
    assert "cannot render" in err.message and "__class__" in err.message


# -- addresses -----------------------------------------------------------------------------------

def test_host_names_as_addresses_give_a_strict_dns_cluster(tmp_path):
    hosts = {"a": {"address": "backend-1.example.internal"}, "b": {"address": "10.0.0.2"}}
    _, states = compiled(tmp_path, service_inventory(hosts=hosts))
    cds = yaml.safe_load(file_named(states["a"], "/envoy/svc/cds.yaml").content)
    assert cds["resources"][0]["type"] == "STRICT_DNS"
    validate.validate_envoy_configs(states)  # the real envoy --mode validate accepts it
    _, states = compiled(tmp_path, service_inventory())
    assert yaml.safe_load(file_named(states["a"], "/envoy/svc/cds.yaml").content)["resources"][0]["type"] == "STATIC"


@pytest.mark.parametrize("address", ["exa mple", "10.0.0.300", "-bad.example", "a..b", "x" * 64 + ".example",
                                     "host.example\n"])
def test_bad_addresses_are_refused(tmp_path, address):
    hosts = {"a": {"address": address}, "b": {"address": "10.0.0.2"}}
    err = refused(tmp_path, service_inventory(hosts=hosts))
    assert err.key == "hosts.a.address" and "neither an IP address nor a host name" in err.message


def test_two_names_for_one_host_are_refused(tmp_path):
    hosts = {"h0": {"address": "10.0.0.1"}, "h1": {"address": "10.0.0.1"}, "a": {"address": "10.0.0.3"},
             "b": {"address": "10.0.0.2"}}
    err = refused(tmp_path, service_inventory(hosts=hosts))
    assert err.key == "hosts.h1" and err.message.startswith("same host as h0")


def test_ports_clash_per_address_not_per_host_name(tmp_path):
    hosts = {"a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.1", "root": "/srv/other"}}
    err = refused(tmp_path, service_inventory(hosts=hosts))
    assert err.key == "services.svc.backends.1"
    assert "port 7073 on host b is already taken by svc backend on a" in err.message


@pytest.mark.parametrize("listen", ["localhost", "1.2.3", "0.0.0.0 ", ""])
def test_listen_address_must_be_an_ip_literal(tmp_path, listen):
    data = service_inventory()
    data["services"]["svc"]["ingress"]["listen_address"] = listen
    err = refused(tmp_path, data)
    assert err.key == "services.svc.ingress.listen_address"
