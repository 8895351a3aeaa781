"""The SSH command of a session (commands.login: preflight, root check, become), checked
without hosts: shellcheck with plain and hostile values, and runs under dash."""

import os
import subprocess

import pytest

from fleet import commands
from tests.test_host_scripts import HOSTILE_DIR, HOSTILE_VALUE

VARIANTS = {
    "plain": {},
    "become": {"become_user": "root"},
    "become with a password": {"become_user": "root", "become_password": True},
}


def login(root, value, **variant):
    return commands.login(commands.session(root, value), name=value, python=value, root=root, user=value, **variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shellcheck_is_clean_on_the_login_command(variant, tmp_path):
    path = tmp_path / "login.sh"
    path.write_text(login("/srv/fleet", "python3", **VARIANTS[variant]))
    result = subprocess.run(["shellcheck", "-s", "sh", "-S", "style", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    # Hostile values: as in test_host_scripts, quotes and $(...) inside a quoted value stay literal;
    # here the python program is such a value too, so a command name may end in '\' (SC2288).
    path.write_text(login(f"/srv/{HOSTILE_DIR}", HOSTILE_VALUE, **VARIANTS[variant]))
    result = subprocess.run(["shellcheck", "-s", "sh", "-S", "style", "-e", "SC2016,SC1003,SC2089,SC2090,SC2288",
                             str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def run_dash(command, cwd):
    return subprocess.run(["dash", "-c", command], input="", capture_output=True, text=True, timeout=30, cwd=cwd)


WHO = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()


def test_preflight_lists_what_is_missing_in_one_line_and_creates_nothing(tmp_path):
    root = str(tmp_path / HOSTILE_DIR / "root")
    python = f"/nonexistent/{HOSTILE_VALUE}"
    result = run_dash(commands.login(commands.session(root, "x"), "h1", python, root, WHO), tmp_path)
    assert result.returncode == 1
    assert result.stdout == f"{WHO} on h1 lacks {python} (preflight; nothing was changed)\n"
    assert not os.path.exists(root) and not (tmp_path / "PWNED3").exists()


def test_a_root_that_cannot_be_created_names_the_key_to_change(tmp_path):
    (tmp_path / "a-file").write_text("")
    root = str(tmp_path / "a-file" / "root")
    result = run_dash(commands.login(commands.session(root, "x"), "h1", "python3", root, WHO), tmp_path)
    assert result.returncode == 1
    assert result.stdout == (f"root {root} is not writable by {WHO}: set root: to a directory {WHO} can write, "
                             "or become: true\n")


@pytest.mark.parametrize("version, lacks", [("Python 3.8.10", True), ("Python 2.7.18", True), ("Python 3.1", True),
                                            ("Python 3.9.0", False), ("Python 3.10.12", False), ("Python 3.13.1", False)])
def test_preflight_reads_the_python_version_without_starting_it(tmp_path, version, lacks):
    """`python -V` (it answers before the interpreter starts), read by the shell: 3.10 is not 3.1."""
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\n[ \"$1\" = -V ] && echo '{version}' && exit 0\nexit 9\n")
    python.chmod(0o755)
    root = str(tmp_path / "root")
    result = run_dash(commands.login(commands.script(commands.Raw("echo session ran")), "h1", str(python), root, WHO),
                      tmp_path)
    if lacks:
        assert result.returncode == 1
        assert result.stdout == f"{WHO} on h1 lacks python 3.9 or newer ({version}) (preflight; nothing was changed)\n"
    else:
        assert result.returncode == 0 and result.stdout == "session ran\n", result.stdout
