"""Bad input through the real command line: one line naming file, line and key; exit code 2;
no traceback; no host contacted (the hosts are real and would show any trace of a visit)."""

import os

import pytest
import yaml

from tests.conftest import inference_inventory, run_fleet
from tests.test_input_bounds import laughs


@pytest.fixture(scope="module")
def good(lab):
    return yaml.safe_dump(inference_inventory(lab), sort_keys=False)


def replace_line(text, old, new):
    assert old in text, old
    return text.replace(old, new, 1)


CASES = {
    "invalid YAML": (lambda t: t + "services: [\n", "invalid YAML"),
    "unknown key": (lambda t: replace_line(t, "    port: 7073", "    port: 7073\n    prot: 1"),
                    "services.inference.prot: unknown key"),
    "missing key": (lambda t: replace_line(t, "    port: 7073\n", ""), "services.inference: missing required key 'port'"),
    "undefined host": (lambda t: replace_line(t, "    - h1", "    - h9"),
                       "services.inference.backends.1: host 'h9' is not defined"),
    "duplicate names": (lambda t: replace_line(t, "  h1:", "  h0:"), "hosts.h0: duplicate key 'h0'"),
    "port clash": (lambda t: replace_line(t, "      port: 8083", "      port: 7073"),
                   "services.inference.ingress.port: port 7073 on host h0 is already taken"),
    "port range": (lambda t: replace_line(t, "port: 8083", "port: 80830"),
                   "services.inference.ingress.port: 80830 is not a port number"),
    "secret from a missing env var": (lambda t: replace_line(t, "    port: 7073", "    port: 7073\n    vars:\n"
                                                             "      modelPath: {env: FLEET_TEST_UNSET_VAR}"),
                                      "services.inference.vars.modelPath.env: environment variable"),
    "alias bomb": (lambda t: laughs(7).replace("hosts: {}\nservices: {}\n", "") + t,
                   "aliases expand to more than 10000 values"),
    "shell in a service name": (lambda t: replace_line(t, "  inference:", "  x$(touch /srv/PWNED):"),
                                "services.x$(touch /srv/PWNED): 'x$(touch /srv/PWNED)' is not a valid name"),
    "root leaving itself": (lambda t: replace_line(t, "root: /srv/fleet", "root: /srv/fleet/../../etc"),
                            "hosts.h0.root: must be a normalised path"),
    "deep nesting": (lambda t: replace_line(t, "    port: 7073", "    port: 7073\n    vars: " + "[" * 5000 + "]" * 5000),
                     "nest"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_inventory(lab, good, tmp_path, case):
    mutate, words = CASES[case]
    path = write_text(tmp_path, mutate(good))
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), result.stderr
    assert words in lines[0]
    assert_untouched(lab)


def test_unknown_service_on_the_command_line(lab, good, tmp_path):
    path = write_text(tmp_path, good)
    result = run_fleet("deploy", "ranking", "-i", path)
    assert result.returncode == 2
    line = good.splitlines().index("services:") + 1
    assert result.stderr.strip() == (f"error: {path}:{line}: services: unknown service 'ranking' "
                                     "(the inventory defines: inference)")
    assert_untouched(lab)


def test_bad_envoy_setting_is_refused_before_any_host(lab, good, tmp_path):
    text = replace_line(good, "      port: 8083", "      port: 8083\n      vars: {health_check_interval: soon}")
    result = run_fleet("deploy", "inference", "-i", write_text(tmp_path, text))
    assert result.returncode == 2 and "rejected by `envoy --mode validate`" in result.stderr
    assert_untouched(lab)


def test_bad_command_line(lab, good, tmp_path):
    result = run_fleet("deploy", "inference", "--limit", "h7", "-i", write_text(tmp_path, good))
    assert result.returncode == 2 and "--limit names unknown host(s): h7" in result.stderr
    result = run_fleet("deplo", "inference")
    assert result.returncode == 2 and "invalid choice: 'deplo'" in result.stderr
    assert_untouched(lab)


def assert_untouched(lab):
    for host in lab.hosts:
        assert os.listdir(host.srv) == [], f"{host.name} was touched"


def write_text(tmp_path, text):
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return str(path)


def test_a_start_timeout_below_one_second_is_refused_where_the_role_uses_it(lab, good, tmp_path):
    """A role's process task given `start_timeout: 0` (here through the service's vars): the
    listen check could never pass. One line naming the role's task, exit 2, no host touched."""
    path = write_text(tmp_path, replace_line(good, "    port: 7073", "    port: 7073\n    vars:\n      start_timeout: 0"))
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "roles/inference/tasks.yaml:" in lines[0], result.stderr
    assert "start_timeout must be at least 1 (second)" in lines[0]
    assert_untouched(lab)
