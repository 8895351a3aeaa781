"""hosts_from: an Ansible inventory (INI or YAML) as the hosts; groups and glob patterns in
backends and --limit (pure: no host is contacted)."""

import pytest

from fleet.errors import UsageError
from tests.conftest import load_inventory

INI = """\
# web servers
[web]
web[01:03] ansible_user=deploy
db1 ansible_host=10.0.0.9 ansible_port=2222 ansible_ssh_private_key_file=keys/db ansible_become=yes

[web:vars]
ansible_python_interpreter=/opt/venv/bin/python
some_app_setting=ignored

[prod:children]
web

[prod:vars]
ansible_user=ops
ansible_become_user=svc
"""

YAML = """\
all:
  vars:
    ansible_user: ops
  children:
    web:
      hosts:
        web01: {ansible_host: 10.0.0.1}
        web02: {ansible_host: 10.0.0.2, ansible_user: deploy}
    db:
      hosts:
        db1: {ansible_host: 10.0.0.9, ansible_port: 2222}
"""


def inventory(tmp_path, ansible, name="hosts.ini", backends="[web]", extra=""):
    (tmp_path / name).write_text(ansible)
    path = tmp_path / "inv.yaml"
    path.write_text(f"""hosts_from: {name}
{extra}services:
  inference:
    port: 7073
    backends: {backends}
    ingress: {{host: db1, port: 8083}}
""")
    return load_inventory(str(path))


def test_ini_hosts_groups_and_connection_variables(tmp_path):
    inv = inventory(tmp_path, INI)
    assert list(inv.hosts) == ["web01", "web02", "web03", "db1"]
    web01, db1 = inv.hosts["web01"], inv.hosts["db1"]
    # host variables win over the group's, a child group's over its parent's
    assert (web01.address, web01.user, web01.python, web01.become_user) == ("web01", "deploy", "/opt/venv/bin/python",
                                                                           "svc")
    assert (db1.address, db1.port, db1.become, db1.key) == ("10.0.0.9", 2222, True, str(tmp_path / "keys" / "db"))
    assert inv.groups["prod"] == ("web01", "web02", "web03", "db1")
    assert [b.host for b in inv.services["inference"].backends] == ["web01", "web02", "web03", "db1"]


def test_yaml_inventory_with_inventory_hosts_laid_over_it(tmp_path):
    inv = inventory(tmp_path, YAML, "hosts.yaml", backends="['web*']",
                    extra="hosts:\n  web02: {user: root}\n  extra: {address: 10.0.0.50}\n")
    assert (inv.hosts["web01"].address, inv.hosts["web01"].user) == ("10.0.0.1", "ops")
    assert (inv.hosts["web02"].address, inv.hosts["web02"].user) == ("10.0.0.2", "root")
    assert inv.hosts["db1"].port == 2222 and "extra" in inv.hosts
    assert [b.host for b in inv.services["inference"].backends] == ["web01", "web02"]


def test_limit_takes_groups_and_patterns(tmp_path):
    inv = inventory(tmp_path, YAML, "hosts.yaml")
    assert inv.limit("db") == {"db1"}
    assert inv.limit("web0*,db1") == {"web01", "web02", "db1"}
    with pytest.raises(UsageError, match="--limit names unknown host"):
        inv.limit("nothing*")


@pytest.mark.parametrize("ansible, name, where", [
    ("[web]\nweb01 ansible_port=many\n", "hosts.ini", "hosts.ini:2: hosts.web01.port: 'many' is not a port number"),
    ("[web]\nbad_name!\n", "hosts.ini", "hosts.ini:2: hosts.bad_name!: 'bad_name!' is not a valid name"),
    ("[web]\nweb01 just-a-word\n", "hosts.ini", "hosts.ini:2: 'just-a-word' is not NAME=VALUE"),
    ("[web]\nweb[05:01]\n", "hosts.ini", "hosts.ini:2: host range 'web[05:01]' runs backwards"),
    ("all:\n  hosts:\n    h1: {ansible_become: maybe}\n", "hosts.yaml", "hosts.yaml:3: hosts.h1.become: must be true"),
])
def test_bad_ansible_inventory_names_its_file_and_line(tmp_path, ansible, name, where):
    (tmp_path / name).write_text(ansible)
    path = tmp_path / "inv.yaml"
    path.write_text(f"hosts_from: {name}\nservices:\n  s:\n    role: inference\n    port: 7073\n"
                    "    backends: [all]\n    ingress: {host: nowhere, port: 8083}\n")
    with pytest.raises(UsageError) as info:
        load_inventory(str(path))
    assert where in info.value.one_line()
