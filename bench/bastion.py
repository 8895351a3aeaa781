"""fleet through one bastion against the same hosts reached directly (issue 10).

Creates 1 + N namespace hosts (tests/hostlab.py): h0 runs Envoy, h1..hN the backends. Times a
cold deploy and an unchanged re-run with every backend reached directly, stops the service,
then the same with every backend behind h0 (`jump: h0`: one SSH connection to h0 carries them
all), into another root so that run is cold too. Prints the times; numbers go to
docs/performance.md ("Through a bastion").

    python bench/bastion.py [--backends 20] [--lab-id 86]
"""

import argparse
import os
import signal
import sys
import tempfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.run import timed  # noqa: E402
from tests.hostlab import HostLab  # noqa: E402


def inventory(lab, directory, through_bastion):
    root = "/srv/fleet-bastion" if through_bastion else "/srv/fleet-direct"
    hosts = lab.inventory_hosts(root=root)
    if through_bastion:
        for name in hosts:
            if name != "h0":
                hosts[name]["jump"] = "h0"
    data = {"hosts": hosts, "services": {"inference": {
        "port": 7073, "backends": [h.name for h in lab.hosts[1:]],
        "ingress": {"host": "h0", "port": 8083}}}}
    path = os.path.join(directory, f"bastion-{through_bastion}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def run(lab, directory, through_bastion):
    path = inventory(lab, directory, through_bastion)
    label = "bastion" if through_bastion else "direct"
    for phase in ("cold", "unchanged"):
        seconds, _, code, output = timed([sys.executable, "-m", "fleet.cli", "deploy", "inference", "-i", path])
        if code != 0 or (phase == "unchanged" and "no changes" not in output):
            raise SystemExit(f"{label} {phase} failed (exit {code}):\n{output[-4000:]}")
        print(f"  {label:<8} {phase:<10} {seconds:7.2f} s", flush=True)
    timed([sys.executable, "-m", "fleet.cli", "stop", "inference", "-i", path])


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, default=20)
    parser.add_argument("--lab-id", type=int, default=int(os.environ.get("FLEET_LAB_ID") or 86))
    args = parser.parse_args()
    print(f"N={args.backends}: 1 ingress/bastion + {args.backends} backends", flush=True)
    with HostLab(args.backends + 1, lab_id=args.lab_id) as lab, tempfile.TemporaryDirectory() as directory:
        run(lab, directory, through_bastion=False)
        run(lab, directory, through_bastion=True)


if __name__ == "__main__":
    main()
