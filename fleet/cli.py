"""The `fleet` command line: parses arguments, loads input, calls the runner, sets the exit code.

Exit codes: 0 everything holds; 1 a host or check failed; 2 bad input (nothing was touched)."""

import argparse
import os
import sys

from fleet import desired, inventory, render, roles, runner, ui, validate
from fleet.errors import UsageError

DEFAULT_INVENTORY = "inventory/local.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = _Parser(prog="fleet", description="Deploy the gRPC serving stack behind Envoy over SSH.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("-i", "--inventory", help=f"inventory file (default: $FLEET_INVENTORY or "
                                                  f"{DEFAULT_INVENTORY} in the fleet checkout)")
    common.add_argument("-l", "--limit", help="only these hosts (comma-separated names)")
    common.add_argument("--accept-new-host-keys", action="store_true",
                        help="trust and record host keys of hosts not yet in known_hosts (never a changed key)")
    deploy = sub.add_parser("deploy", parents=[common], help="deploy a service and prove it answers through Envoy")
    deploy.add_argument("service")
    deploy.add_argument("-C", "--check", action="store_true", help="show what would change, touch nothing")
    for name, help_text in (("status", "process, port and Envoy endpoint state of a service"),
                            ("stop", "stop a service's Envoy and backends")):
        sub.add_parser(name, parents=[common], help=help_text).add_argument("service")
    return parser


def main(argv=None):
    console = ui.make_console()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, console)
    except UsageError as e:
        ui.error(e.one_line())
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: files on hosts are whole (atomic writes); re-run to finish")
        return 130


def load(args):
    """Inventory, roles and desired state for the command's service; raises UsageError on bad input."""
    home = roles.project_dir()
    project = desired.Project(roles=roles.load_roles(os.path.join(home, "roles")),
                              playbook=roles.load_playbook(os.path.join(home, "playbooks", "deploy.yaml")),
                              renderer=render.Renderer(os.path.join(home, "templates")))
    path = args.inventory or os.environ.get("FLEET_INVENTORY") or os.path.join(home, DEFAULT_INVENTORY)
    inv = inventory.load(path, set(project.roles))
    services = [inv.service(args.service)]
    limit = inv.limit(args.limit)
    states = {name: state for name, state in desired.compile_services(inv, services, project).items()
              if name in limit}
    return inv, services, states


def options(args, check=False):
    return runner.Options(check=check, accept_new_host_keys=args.accept_new_host_keys)


def cmd_deploy(args, console):
    inv, services, states = load(args)
    validate.validate_envoy_configs(states)
    outcomes, checks = runner.deploy(states, services, inv, options(args, args.check), console)
    if args.check:
        ui.check_report(console, {o.host: o.plan for o in outcomes if o.plan},
                        {o.host: o.error for o in outcomes if o.error})
        return EXIT_OK if all(o.error is None for o in outcomes) else EXIT_FAILED
    ui.summary(console, outcomes, checks)
    ok = all(o.ok for o in outcomes) and all(c[1] for c in checks)
    if ok and not any(o.counts()["changed"] for o in outcomes):
        console.print("[green]no changes[/]: every host already matched the inventory")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_status(args, console):
    inv, services, states = load(args)
    statuses, views = runner.status(states, services, inv, options(args))
    ui.status_report(console, statuses, views)
    healthy = all(s.error is None and all(p.ok for p in s.ports) for s in statuses)
    return EXIT_OK if healthy else EXIT_FAILED


def cmd_stop(args, console):
    inv, services, states = load(args)
    outcomes = runner.stop(states, options(args))
    ui.stop_report(console, outcomes)
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILED


COMMANDS = {"deploy": cmd_deploy, "status": cmd_status, "stop": cmd_stop}

if __name__ == "__main__":
    sys.exit(main())
