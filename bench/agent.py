"""What fleet's host agent buys: an unchanged `fleet deploy inference` on 1 ingress + N backend
hosts that log in as a plain /bin/sh user (no login-shell tax), with the agent (the default) and
with `agent: false` on every host, alternated in one sitting. Prints every time and the medians.
No assertion: the numbers go to docs/performance.md (issue 8's rule: under a fifth, remove it).

    python bench/agent.py [--backends 20] [--repeats 5]
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.run import timed  # noqa: E402
from tests.hostlab import HostLab  # noqa: E402


def inventory(lab, directory, agent):
    hosts = lab.inventory_hosts()
    for host in hosts.values():
        host["agent"] = agent
    data = {"hosts": hosts, "services": {"inference": {
        "port": 7073, "backends": [h.name for h in lab.hosts[1:]], "ingress": {"host": "h0", "port": 8083}}}}
    path = os.path.join(directory, f"agent-{agent}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def deploy(path, env):
    seconds, _, code, output = timed([sys.executable, "-m", "fleet.cli", "deploy", "inference", "-i", path], env=env)
    if code != 0:
        raise SystemExit(f"deploy failed (exit {code}):\n{output[-4000:]}")
    return seconds, output


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the lab is still removed
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lab_id = int(os.environ.get("FLEET_LAB_ID", 230))
    with HostLab(args.backends + 1, lab_id=lab_id, plain_user=True) as lab, \
            tempfile.TemporaryDirectory() as directory:
        # The agents' ports and tokens go to a cache of this run's own, not the operator's.
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(directory, "cache"))
        paths = {agent: inventory(lab, directory, agent) for agent in (True, False)}
        seconds, _ = deploy(paths[True], env)  # cold; starts the agents
        print(f"cold deploy (starts the agents): {seconds:.2f} s", flush=True)
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for agent in (True, False):  # alternated, so drift in the machine's load hits both alike
                seconds, output = deploy(paths[agent], env)
                if "no changes" not in output:
                    raise SystemExit(f"an unchanged run changed something:\n{output[-4000:]}")
                times[agent].append(seconds)
                print(f"  unchanged, agent {'on ' if agent else 'off'}  {seconds:6.2f} s", flush=True)
    with_agent, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"median of {args.repeats}: agent on {with_agent:.2f} s, agent off {without:.2f} s; "
          f"the agent saves {without - with_agent:.2f} s = {(without - with_agent) / without:.0%} of the time")


if __name__ == "__main__":
    main()
