"""Changing a live service at N backends: requests sent and failed under load, and how long each
change took, for this fleet (rolling, drained from Envoy) and for the fleet of before issue 9
(all backends restarted at once), in one sitting on the same namespace hosts.

Each scenario runs while 4 long-lived gRPC channels call doPredict through Envoy (tests/load.py).
The earlier fleet runs from a git worktree of BASELINE_COMMIT under its own root (/srv/old), is
stopped, then this fleet runs the same scenarios under /srv/fleet. No assertion: the numbers go
to docs/operations.md.

    python bench/operations.py --backends 20 [--out bench/operations.json] [--no-baseline]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.hostlab import HostLab  # noqa: E402
from tests.load import Load  # noqa: E402

# main when issue 9 was filed: a change restarted every backend in the same second.
BASELINE_COMMIT = "3c30ce0"


def write(directory, name, data):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def inventory(lab, root, backends, **vars):
    service = {"port": 7073, "backends": list(backends), "ingress": {"host": "h0", "port": 8083}}
    if vars:
        service["vars"] = vars
    return {"hosts": lab.inventory_hosts(root=root), "services": {"inference": service}}


def fleet(cwd, *args):
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def under_load(lab, action):
    with Load(f"{lab.host('h0').address}:8083") as load:
        time.sleep(1)
        started = time.perf_counter()
        code = action()
        seconds = time.perf_counter() - started
        time.sleep(1)
    return {"sent": load.sent, "failed": load.failed, "errors": dict(load.errors), "seconds": round(seconds, 2),
            "exit": code}


def pid_of(lab, root, host):
    path = os.path.join(lab.host(host).srv, os.path.basename(root), "run", "inference.pid")
    with open(path) as f:
        return int(f.read())


def scenarios(lab, cwd, root, directory, n, artifact, rollback=True):
    """Runs every scenario with the fleet found in cwd (`fleet rollback` only where it has one);
    returns {scenario: numbers}."""
    hosts = [f"h{i}" for i in range(1, n + 1)]
    extra = f"h{n + 1}"
    results = {}

    def deploy(name, data):
        path = write(directory, f"{os.path.basename(root)}-{name}.yaml", data)
        return under_load(lab, lambda: fleet(cwd, "deploy", "inference", "-i", path).returncode)

    base = inventory(lab, root, hosts, modelParallelism=4)
    assert fleet(cwd, "deploy", "inference", "-i", write(directory, "base.yaml", base)).returncode == 0
    results["a service variable"] = deploy("variable", inventory(lab, root, hosts, modelParallelism=3))
    results["a new artifact"] = deploy("artifact", inventory(lab, root, hosts, modelParallelism=3,
                                                             artifact=artifact))
    if rollback:  # back to the release before the new artifact, rolling like a deploy
        path = write(directory, f"{os.path.basename(root)}-artifact.yaml", inventory(lab, root, hosts,
                                                                                    modelParallelism=3))
        results["fleet rollback inference"] = under_load(
            lab, lambda: fleet(cwd, "rollback", "inference", "-i", path).returncode)
    results["a backend added"] = deploy("add", inventory(lab, root, hosts + [extra], modelParallelism=3,
                                                         artifact=artifact))
    fewer = [h for h in hosts if h != "h2"] + [extra]
    results["a backend removed"] = deploy("remove", inventory(lab, root, fewer, modelParallelism=3,
                                                              artifact=artifact))
    results["a version that never listens"] = deploy("never", inventory(
        lab, root, fewer, modelParallelism=3, artifact=artifact, command="sleep 300", start_timeout=4))
    # Leave every backend on the good release (the earlier fleet may have left them down).
    good = write(directory, f"{os.path.basename(root)}-good.yaml", inventory(lab, root, fewer, modelParallelism=3,
                                                                             artifact=artifact))
    fleet(cwd, "deploy", "inference", "-i", good)
    # A change that needs a new Envoy process (its log level): the earlier fleet stopped Envoy
    # and started a new one; this one hands over to the next epoch (hot restart).
    logged = inventory(lab, root, fewer, modelParallelism=3, artifact=artifact)
    logged["services"]["inference"]["ingress"]["vars"] = {"envoy_log_level": "info"}
    results["Envoy's log level (a new Envoy process)"] = deploy("envoy", logged)
    fleet(cwd, "deploy", "inference", "-i", good)
    killed = pid_of(lab, root, "h1")

    def kill_and_wait():
        os.kill(killed, 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                now = pid_of(lab, root, "h1")
                if now != killed:
                    os.kill(now, 0)  # the host's processes share this machine's pid namespace
                    return 0
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        return 1  # not back within 10 s without a fleet command

    results["kill -9 of a backend (10 s, no fleet command)"] = under_load(lab, kill_and_wait)
    fleet(cwd, "stop", "inference", "-i", write(directory, "stop.yaml", inventory(lab, root, fewer + ["h2"])))
    return results


def baseline_checkout(git_dir):
    path = tempfile.mkdtemp(prefix="fleet-baseline-")
    subprocess.run(["git", "-C", git_dir, "worktree", "add", "--detach", path, BASELINE_COMMIT], check=True,
                   capture_output=True)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "operations.json"))
    parser.add_argument("--no-baseline", action="store_true", help="only this fleet")
    parser.add_argument("--lab-id", type=int, default=228)
    parser.add_argument("--git", default=REPO, help="the git checkout holding BASELINE_COMMIT (default: this one)")
    args = parser.parse_args()
    n = args.backends
    results = {"backends": n, "clients": 4, "baseline_commit": BASELINE_COMMIT, "runs": {}}
    with HostLab(n + 2, lab_id=args.lab_id) as lab, tempfile.TemporaryDirectory() as directory:
        from fleet import artifacts
        artifact = os.path.join(directory, "services-v2.pyz")
        shutil.copy(artifacts.resolve("builtin:services", ".").path, artifact)
        with zipfile.ZipFile(artifact, "a") as zf:
            zf.writestr("RELEASE", "v2\n")
        if not args.no_baseline:
            checkout = baseline_checkout(args.git)
            try:
                # The earlier fleet builds its own services artifact; the v2 one is made from it.
                old_artifact = os.path.join(directory, "old-services-v2.pyz")
                subprocess.run([sys.executable, "-c", "from fleet import artifacts; import shutil, sys; "
                                "shutil.copy(artifacts.resolve('builtin:services', '.').path, sys.argv[1])",
                                old_artifact], cwd=checkout, check=True)
                with zipfile.ZipFile(old_artifact, "a") as zf:
                    zf.writestr("RELEASE", "v2\n")
                results["runs"]["all at once (before issue 9)"] = scenarios(lab, checkout, "/srv/old", directory,
                                                                            n, old_artifact, rollback=False)
            finally:
                subprocess.run(["git", "-C", args.git, "worktree", "remove", "--force", checkout], capture_output=True)
        results["runs"]["rolling (this fleet)"] = scenarios(lab, REPO, "/srv/fleet", directory, n, artifact)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for run, numbers in results["runs"].items():
        print(run)
        for scenario, r in numbers.items():
            print(f"  {scenario:<48} sent {r['sent']:>7}  failed {r['failed']:>5}  {r['seconds']:>6.1f} s  "
                  f"exit {r['exit']}")


if __name__ == "__main__":
    main()
