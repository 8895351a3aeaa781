"""The same job as `fleet deploy inference` and bench/ansible/deploy.yml, as a pyinfra user would
write it: push the service artifact and config, start it if not running and restart it when
changed; render, validate and (re)start Envoy; check with netstat that each port is listened on
by the right program. bench/run.py writes the inventory (its host data: root, python, artifact,
envoy_binary, modelParallelism, backend_addresses) and runs `pyinfra -y INVENTORY deploy.py`."""

import os
import shlex

from pyinfra import host
from pyinfra.operations import files, server
from pyinfra.operations.util import any_changed

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")


def restart(directory, command):
    """Stop the running copy (if any) and wait for it to exit (it drains first; 30 s at most), start
    a new one detached; its pid in ./pid."""
    return (f"cd {shlex.quote(directory)} && {{ if [ -f pid ] && kill \"$(cat pid)\" 2>/dev/null; then i=0; "
            f"while kill -0 \"$(cat pid)\" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; fi; "
            f"setsid {command} > out.log 2>&1 < /dev/null & echo $! > pid; }}")


def start_if_stopped(directory, command):
    return f"cd {shlex.quote(directory)} && {{ kill -0 \"$(cat pid 2>/dev/null)\" 2>/dev/null || {{ " \
           f"setsid {command} > out.log 2>&1 < /dev/null & echo $! > pid; }}; }}"


def wait_and_check(port, program):
    """Wait (bounded, 60 s) for the port, then netstat must show it listened on by `program`."""
    return (f"i=0; until netstat -tnl | grep -q ':{port} '; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; "
            f"done; netstat -tnlp 2>/dev/null | grep -Eq ':{port} .*LISTEN +[0-9]+/\\S*{program}'")


root = host.data.root
if "backends" in host.groups:
    app = f"{root}/app"
    service = f"{shlex.quote(host.data.python)} friesian-services.pyz inference -c config.yaml"
    files.directory(name="directories", path=app)
    artifact = files.put(name="service artifact", src=host.data.artifact, dest=f"{app}/friesian-services.pyz")
    config = files.template(name="service config", src=os.path.join(TEMPLATES, "inference.yaml.j2"),
                            dest=f"{app}/config.yaml", modelParallelism=host.data.modelParallelism)
    server.shell(name="restart inference", commands=[restart(app, service)], _if=any_changed(artifact, config))
    server.shell(name="start inference if not running", commands=[start_if_stopped(app, service)])
    server.shell(name="port 7073 listened on by the service", commands=[wait_and_check(7073, "python")])

if "ingress" in host.groups:
    envoy_dir = f"{root}/envoy"
    envoy = "./envoy -c envoy.yaml --disable-hot-restart --log-level warn"
    files.directory(name="directories", path=envoy_dir)
    binary = files.put(name="envoy binary", src=host.data.envoy_binary, dest=f"{envoy_dir}/envoy", mode="755")
    config = files.template(name="envoy config", src=os.path.join(TEMPLATES, "envoy.yaml.j2"),
                            dest=f"{envoy_dir}/envoy.yaml", backend_addresses=host.data.backend_addresses)
    server.shell(name="validate envoy config",
                 commands=[f"{envoy_dir}/envoy --mode validate -c {envoy_dir}/envoy.yaml --log-level error"],
                 _if=any_changed(binary, config))
    server.shell(name="restart envoy", commands=[restart(envoy_dir, envoy)], _if=any_changed(binary, config))
    server.shell(name="start envoy if not running", commands=[start_if_stopped(envoy_dir, envoy)])
    server.shell(name="ports 8083 and 9090 listened on by envoy",
                 commands=[wait_and_check(8083, "envoy") + " && " + wait_and_check(9090, "envoy")])
