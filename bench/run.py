"""fleet beside Ansible, on the same namespace hosts in the same run.

For each N it creates 1 ingress + N backend hosts (real sshd in network namespaces, see
tests/hostlab.py) and times, for fleet and then for the Ansible playbook in bench/ansible/ doing
the same job: (a) a cold deploy, (b) an unchanged re-run, (c) a re-run after a one-line change
to the inference service's config. Prints the times, fleet/Ansible ratios and fleet's peak
memory; writes them as JSON. No assertion: numbers go to docs/performance.md.

    python bench/run.py --backends 2,20,100 [--out bench/results.json] [--no-ansible]
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fleet import artifacts  # noqa: E402
from tests.hostlab import HostLab  # noqa: E402

ANSIBLE_DIR = os.path.join(REPO, "bench", "ansible")
PHASES = ("cold", "unchanged", "changed")


def timed(cmd, env=None, cwd=REPO):
    """(seconds, peak RSS in MB, exit code, output) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    return elapsed, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def fleet_inventory(lab, directory, parallelism):
    backends = [h.name for h in lab.hosts[1:]]
    data = {"hosts": lab.inventory_hosts(root="/srv/fleet"), "services": {"inference": {
        "port": 7073, "backends": backends, "ingress": {"host": "h0", "port": 8083},
        "vars": {"modelParallelism": parallelism}}}}
    path = os.path.join(directory, f"fleet-{parallelism}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def ansible_inventory(lab, directory, parallelism):
    def hosts(selected):
        return {h.name: {"ansible_host": h.address} for h in selected}

    data = {"all": {
        "vars": {
            "ansible_user": "root", "ansible_ssh_private_key_file": lab.client_key,
            "ansible_python_interpreter": sys.executable, "python": sys.executable, "root": "/srv/ansible",
            "artifact": artifacts.resolve("builtin:services", ".").path,
            "envoy_binary": artifacts.resolve("builtin:envoy", ".").path,
            "modelParallelism": parallelism,
        },
        "children": {"ingress": {"hosts": hosts(lab.hosts[:1])}, "backends": {"hosts": hosts(lab.hosts[1:])}},
    }}
    path = os.path.join(directory, f"ansible-{parallelism}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def run_fleet(lab, directory):
    results = {}
    for phase, parallelism in zip(PHASES, (4, 4, 5)):
        inventory = fleet_inventory(lab, directory, parallelism)
        seconds, peak, code, output = timed([sys.executable, "-m", "fleet.cli", "deploy", "inference", "-i",
                                             inventory])
        if code != 0:
            raise SystemExit(f"fleet {phase} failed (exit {code}):\n{output[-4000:]}")
        if phase == "unchanged" and "no changes" not in output:
            raise SystemExit(f"fleet's unchanged run changed something:\n{output[-4000:]}")
        results[phase] = {"seconds": round(seconds, 2), "peak_mb": round(peak, 1)}
        print(f"  fleet   {phase:<10} {seconds:7.2f} s  peak {peak:6.1f} MB", flush=True)
    # Free the ports for Ansible's copy of the same service.
    timed([sys.executable, "-m", "fleet.cli", "stop", "inference", "-i", fleet_inventory(lab, directory, 5)])
    return results


def run_ansible(lab, directory, forks):
    control = tempfile.mkdtemp(prefix="fleet-bench-cp-")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ANSIBLE_DIR, "ansible.cfg"), ANSIBLE_FORKS=str(forks),
               ANSIBLE_SSH_CONTROL_PATH_DIR=control,
               ANSIBLE_SSH_ARGS="-o ControlMaster=auto -o ControlPersist=120s -o StrictHostKeyChecking=yes "
                                f"-o UserKnownHostsFile={lab.known_hosts}")
    playbook = os.path.join(ANSIBLE_DIR, "deploy.yml")
    results = {}
    for phase, parallelism in zip(PHASES, (4, 4, 5)):
        inventory = ansible_inventory(lab, directory, parallelism)
        seconds, _, code, output = timed(["ansible-playbook", "-i", inventory, playbook], env=env, cwd=ANSIBLE_DIR)
        if code != 0:
            raise SystemExit(f"ansible {phase} failed (exit {code}):\n{output[-4000:]}")
        results[phase] = {"seconds": round(seconds, 2)}
        print(f"  ansible {phase:<10} {seconds:7.2f} s", flush=True)
    subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={control}/%C", "x"], capture_output=True)
    return results


def bench(n, with_ansible, lab_id):
    print(f"N={n}: 1 ingress + {n} backends", flush=True)
    with HostLab(n + 1, lab_id=lab_id) as lab, tempfile.TemporaryDirectory() as directory:
        row = {"fleet": run_fleet(lab, directory)}
        if with_ansible:
            row["ansible"] = run_ansible(lab, directory, forks=n + 1)
            for phase in PHASES:
                ratio = row["fleet"][phase]["seconds"] / row["ansible"][phase]["seconds"]
                row["fleet"][phase]["ratio"] = round(ratio, 3)
                print(f"  {phase:<10} fleet/ansible = {ratio:.3f}  (1/{1 / ratio:.1f})", flush=True)
        row["fleet_peak_mb"] = max(p["peak_mb"] for p in row["fleet"].values())
        print(f"  fleet peak memory {row['fleet_peak_mb']} MB", flush=True)
        return row


def main():
    # A killed benchmark still removes its hosts (HostLab's context exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="2,20,100", help="comma-separated N values")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results.json"))
    parser.add_argument("--no-ansible", action="store_true", help="time fleet only")
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}, "runs": {}}
    for i, n in enumerate(int(x) for x in args.backends.split(",")):
        results["runs"][str(n)] = bench(n, not args.no_ansible, lab_id=230 + i)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
