"""Hostile values end to end on namespace hosts (issue 8, findings 2 and 5): a root with a space,
a value with a newline that would add a config key, and a secret that looks like a template."""

import os
import re
import stat

import pytest
import yaml

from tests.conftest import run_fleet, write_inventory

PREFIX = "{{ 7*7 }}\nservicePort: 7999"  # a secret, a template and a config key, if any were evaluated


@pytest.fixture(scope="module")
def deployed(lab, tmp_path_factory):
    data = {"hosts": lab.inventory_hosts(root="/srv/my fleet"), "services": {"feature": {
        "port": 7072, "backends": ["h0", "h1"], "ingress": {"host": "h0", "port": 8082},
        "vars": {"redisKeyPrefix": {"secret": PREFIX}}}}}
    path = write_inventory(tmp_path_factory.mktemp("inv"), data)
    result = run_fleet("deploy", "feature", "-i", path)
    yield result
    run_fleet("stop", "feature", "-i", path)


def test_root_with_a_space_deploys(lab, deployed):
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    for host in ("h0", "h1"):
        out = lab.exec(host, "netstat", "-tnlp")
        assert re.search(r":7072\s.*LISTEN", out) and not re.search(r":7999\s", out)


def test_the_secret_reaches_the_host_as_written_and_nowhere_else(lab, deployed):
    config = os.path.join(lab.host("h1").srv, "my fleet", "services", "feature", "config.yaml")
    with open(config) as f:
        values = yaml.safe_load(f)
    assert (values["redisKeyPrefix"], values["servicePort"]) == (PREFIX, 7072)
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert "7*7" not in deployed.stdout + deployed.stderr
