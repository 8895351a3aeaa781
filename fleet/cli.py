"""The `fleet` command line: parses arguments, loads input, calls the runner, sets the exit code.

Exit codes: 0 everything holds; 1 a host or check failed; 2 bad input (nothing was touched)."""

import argparse
import os
import sys
import time

from fleet import desired, inventory, render, roles, runner, ui, validate, verify
from fleet.errors import UsageError

DEFAULT_INVENTORY = "inventory/local.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


ALL = "all"


def build_parser():
    parser = _Parser(prog="fleet", description="Deploy the gRPC serving stack behind Envoy over SSH.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("-i", "--inventory", help=f"inventory file (default: $FLEET_INVENTORY or "
                                                  f"{DEFAULT_INVENTORY} in the fleet checkout)")
    common.add_argument("-l", "--limit", help="only these hosts (comma-separated names)")
    common.add_argument("--accept-new-host-keys", action="store_true",
                        help="trust and record host keys of hosts not yet in known_hosts (never a changed key)")
    common.add_argument("--wait-lock", type=int, default=0, metavar="SECONDS",
                        help="wait this long for another deploy's lock on a host (default: refuse at once)")
    common.add_argument("--break-lock", action="store_true",
                        help="end the session holding a host's lock (a stale deploy) and take it")
    service_help = f"a service of the inventory, or '{ALL}'"
    deploy = sub.add_parser("deploy", parents=[common], help="deploy and prove it answers through Envoy")
    deploy.add_argument("service", help=service_help + " (in dependency order)")
    deploy.add_argument("-C", "--check", action="store_true", help="show what would change, touch nothing")
    deploy.add_argument("--timings", action="store_true", help="show where the time went, per phase")
    for name, help_text in (("status", "process, port and Envoy endpoint state"),
                            ("stop", "stop Envoy, then the backends")):
        sub.add_parser(name, parents=[common], help=help_text).add_argument("service", help=service_help)
    smoke = sub.add_parser("smoke", parents=[common], help="ask the recommender for recommendations through Envoy")
    smoke.add_argument("--service", default="recommender", help="the recommender service (default: recommender)")
    smoke.add_argument("--users", default="0,1,2", help="user IDs, comma-separated (default: 0,1,2)")
    smoke.add_argument("--num", type=int, default=5, help="recommendNum (default: 5)")
    smoke.add_argument("--candidates", type=int, default=50, help="candidateNum (default: 50)")
    return parser


def main(argv=None):
    console = ui.make_console()
    box = _FleetBox()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, console, box)
    except UsageError as e:
        ui.error(e.one_line())
        return EXIT_USAGE
    except KeyboardInterrupt:
        if box.fleet:
            box.fleet.abort()
        ui.error("interrupted: no host has a half-written file (files are renamed into place whole); "
                 "run the same command again to finish")
        return EXIT_INTERRUPTED
    finally:
        if box.fleet:
            box.fleet.close()


def load(args, service=None):
    """Project, inventory, the services named (default: the command's) and the --limit hosts."""
    home = roles.project_dir()
    project = desired.Project(roles=roles.load_roles(os.path.join(home, "roles")),
                              playbook=roles.load_playbook(os.path.join(home, "playbooks", "deploy.yaml")),
                              renderer=render.Renderer(os.path.join(home, "templates")))
    path = args.inventory or os.environ.get("FLEET_INVENTORY") or os.path.join(home, DEFAULT_INVENTORY)
    inv = inventory.load(path, set(project.roles))
    service = service or args.service
    services = list(inv.services.values()) if service == ALL else [inv.service(service)]
    return project, inv, services, inv.limit(args.limit)


def host_states(project, inv, services, limit):
    return {name: state for name, state in desired.compile_services(inv, services, project).items()
            if name in limit}


def open_fleet(args, inv, lock=True, check=False):
    return runner.Fleet(runner.Options(check=check, accept_new_host_keys=args.accept_new_host_keys, lock=lock,
                                       wait_lock=args.wait_lock, break_lock=args.break_lock), mask=inv.mask)


def cmd_deploy(args, console, fleet_box):
    started = time.perf_counter()
    project, inv, services, limit = load(args)
    waves = [(wave, host_states(project, inv, wave, limit)) for wave in desired.deploy_order(inv, services, project)]
    for _, states in waves:  # every config is checked before any host is touched
        validate.validate_envoy_configs(states, mask=inv.mask)
    compiled = time.perf_counter() - started
    fleet = fleet_box.open(open_fleet(args, inv, check=args.check))
    ok, changed = True, False

    for number, (wave, states) in enumerate(waves, 1):
        if len(waves) > 1:
            console.print(f"[bold]wave {number}/{len(waves)}[/]: {', '.join(s.name for s in wave)}")
        outcomes, checks = runner.deploy(fleet, states, wave, inv, console)
        if args.timings:
            ui.timings(console, outcomes, dict(fleet.timings, **{"load, render, validate": compiled}))
        if args.check:
            ui.check_report(console, {o.host: o.plan for o in outcomes if o.plan},
                            {o.host: o.error for o in outcomes if o.error})
            ok = ok and all(o.error is None for o in outcomes)
            continue
        ui.summary(console, outcomes, checks)
        ok = all(o.ok for o in outcomes) and all(c[1] for c in checks)
        changed = changed or any(o.counts()["changed"] for o in outcomes)
        if not ok:
            if number < len(waves):
                ui.error(f"stopped after wave {number}: later services depend on "
                         f"{', '.join(s.name for s in wave)}")
            return EXIT_FAILED
    if ok and not changed and not args.check:
        console.print("[green]no changes[/]: every host already matched the inventory")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_status(args, console, fleet_box):
    project, inv, services, limit = load(args)
    fleet = fleet_box.open(open_fleet(args, inv, lock=False))
    statuses, views = runner.status(fleet, host_states(project, inv, services, limit), services)
    ui.status_report(console, statuses, views)
    healthy = all(s.error is None and all(p.ok for p in s.ports) for s in statuses)
    # Envoy unreadable, or a backend out of its rotation, is as unhealthy as a dead process.
    in_rotation = all(not isinstance(view, str) and all(e.healthy for e in view) for view in views.values())
    return EXIT_OK if healthy and in_rotation else EXIT_FAILED


def cmd_stop(args, console, fleet_box):
    project, inv, services, limit = load(args)
    fleet = fleet_box.open(open_fleet(args, inv))
    outcomes = runner.stop(fleet, host_states(project, inv, services, limit))
    ui.stop_report(console, outcomes)
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILED


def cmd_smoke(args, console, fleet_box):
    _, inv, (service,), _ = load(args)
    try:
        users = [int(u) for u in args.users.split(",") if u.strip()]
    except ValueError:
        raise UsageError(f"--users takes comma-separated integer IDs, not {args.users!r}") from None
    address = f"{inv.ingress_address(service)}:{service.ingress.port}"
    try:
        answers = verify.recommend(address, users, args.num, args.candidates)
    except verify.RecommendFailed as e:
        ui.error(f"getRecommendIDs through {address}: {e}")
        return EXIT_FAILED
    ui.recommendations(console, address, users, answers)
    return EXIT_OK


class _FleetBox:
    """Holds the command's Fleet so main() can close it, or abort it on Ctrl-C."""

    fleet = None

    def open(self, fleet):
        self.fleet = fleet
        return fleet


COMMANDS = {"deploy": cmd_deploy, "status": cmd_status, "stop": cmd_stop, "smoke": cmd_smoke}

if __name__ == "__main__":
    sys.exit(main())
