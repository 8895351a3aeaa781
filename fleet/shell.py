"""Shell command lines as values, quoted by construction (as pyinfra's StringCommand does).

A script line is built from words: every word is quoted for a POSIX shell unless it is `Raw`,
which only code in fleet writes (shell syntax, variable references such as "$R/run"). A value
from an inventory, a role or a rendered template is never Raw, so it can never become shell
syntax, whatever it holds."""

import shlex


class Raw(str):
    """Shell text written by fleet itself, used as is."""


def quote(word):
    return word if isinstance(word, Raw) else shlex.quote(str(word))


def line(*words):
    """One command line: each word quoted unless Raw."""
    return Raw(" ".join(quote(w) for w in words))


def word(*parts):
    """One shell word joined from parts, each quoted unless Raw: word(Raw('"$R"/run/'), name)."""
    return Raw("".join(quote(p) for p in parts))


def assign(name, *parts):
    """NAME=word(parts); NAME is fleet's own variable name."""
    return Raw(f"{name}={word(*parts)}")


def script(*lines):
    return Raw("\n".join(lines) + "\n")
