"""Fresh hosts (`venv: true`): the services' Python dependencies, as wheels for the host's own
platform, fetched on the controller (pip download, cached) and installed into a venv under the
host's root. A host needs only its python3: no pip, no internet, no compiler.

Inside the run's one session: a step learns the host's machine, libc and Python and which
wheel set its venv holds; only if that differs, a second step receives the missing wheels
(content-addressed under ROOT/wheels) and builds ROOT/venv from them (unzipped, no pip)."""

import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass


from fleet import commands, connection
from fleet.artifacts import Unavailable, cache_dir, file_sha256, fill_once, last_line as _last
from fleet.protocol import PLATFORM, VENV, WHEELS, Sent
from fleet.shell import Raw, line, script

SERVICES_DISTRIBUTION = "friesian-services"
# Deadlines of its host steps: the probe, and building the venv (plus a second per MiB of wheels).
PROBE_SECONDS = 30
VENV_SECONDS = 120
PIP_SECONDS = 600  # one pip download of the wheel set, at most
# pip downloads: the wheel set, then what pip left out (_left_out), then what those need.
PIP_ROUNDS = 3
# How long a run waits for another run's fill of a wheel set: its pip rounds, and a minute.
WHEELS_FILL_WAIT_SECONDS = PIP_ROUNDS * PIP_SECONDS + 60
_PROBE = ("import platform, sys; libc, version = platform.libc_ver(); "
          f"print({PLATFORM!r}, platform.machine(), libc or 'musl', version or '1.2', platform.python_version())")
# Unzips wheels into the venv's site-packages; a wheel's NAME.data/{purelib,platlib} go there too.
_INSTALL = """import os, shutil, sys, sysconfig, zipfile
site = sysconfig.get_paths()["purelib"]
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
for entry in os.listdir(site):
    if entry.endswith(".data"):
        for kind in ("purelib", "platlib"):
            part = os.path.join(site, entry, kind)
            for item in os.listdir(part) if os.path.isdir(part) else ():
                shutil.move(os.path.join(part, item), site)
        shutil.rmtree(os.path.join(site, entry))
"""


@dataclass(frozen=True)
class Platform:
    machine: str  # x86_64, aarch64
    libc: str  # glibc or musl
    libc_version: str  # 2.36
    python: str  # 3.11.2

    @property
    def python_tag(self):
        return "cp" + "".join(self.python.split(".")[:2])

    def markers(self):
        """The host's environment markers (PEP 508): pip evaluates a dependency's markers on the
        controller's Python, so fleet checks them again for the host's."""
        return {"python_version": ".".join(self.python.split(".")[:2]), "python_full_version": self.python,
                "platform_machine": self.machine, "sys_platform": "linux", "platform_system": "Linux",
                "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "extra": ""}

    @property
    def tag(self):
        """The newest wheel platform tag the host takes (names the cache directory)."""
        return self.tags()[0]

    def tags(self):
        """Every wheel platform tag the host takes, newest first: pip download does not widen
        a given tag to the older ones itself."""
        if self.libc != "glibc":
            return [f"musllinux_1_{minor}_{self.machine}" for minor in (2, 1)]
        major, minor = (int(x) for x in self.libc_version.split(".")[:2])
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        return tags + [f"manylinux2014_{self.machine}"]


@dataclass(frozen=True)
class Wheel:
    """A payload member as ScriptSession sends it: no inline content, streamed from `source`."""

    source: str  # on the controller
    name: str  # on the host, under ROOT/wheels: content-addressed
    content: None = None


def prepare(host, session):
    """Makes ROOT/venv hold the services' dependencies for this host's platform, if the host
    asks for it (venv: true); raises connection.ConnectFailed with one line if it cannot."""
    if not host.venv_from:
        return
    probe = session.run(script(line(host.venv_from, "-c", _PROBE),
                               Raw(f'echo "{VENV} $(cat "$R/venv/.fleet-wheels" 2>/dev/null)"'),
                               Raw(f'echo "{WHEELS}" $(ls "$R/wheels" 2>/dev/null)')), PROBE_SECONDS, "platform probe")
    found = {tag: rest for tag, _, rest in (l.partition(" ") for l in probe.output.splitlines())
             if tag in (PLATFORM, VENV, WHEELS)}
    if PLATFORM not in found:
        raise connection.ConnectFailed(f"{host.venv_from} on {host.name} did not report its platform: "
                                       f"{probe.output.strip()[-200:] or 'no output'}")
    platform = Platform(*found[PLATFORM].split())
    wheels = wheelhouse(platform)
    wanted = wheel_set(wheels)
    if found.get(VENV, "").strip() == wanted:
        return
    there = set(found.get(WHEELS, "").split())
    missing = [w for w in wheels if w.name not in there]
    sent = [Sent.measured(w.name, 0o600, w.name, w) for w in missing]
    result = session.run(install_script(host, wheels, sent, wanted),
                         VENV_SECONDS + sum(s.size for s in sent) / (1 << 20), "venv", payload=sent)
    if result.exit_code != 0:
        raise connection.ConnectFailed(f"building the venv on {host.name} failed: {_last(result.output)}")


def wheel_set(wheels):
    return hashlib.sha256(" ".join(sorted(w.name for w in wheels)).encode()).hexdigest()[:16]


def install_script(host, wheels, sent, wanted):
    """Receives the missing wheels (`sent`: protocol.Sent), builds ROOT/venv.new from the host's
    python and all `wheels`, then swaps it in for ROOT/venv."""
    names = [w.name for w in wheels]
    return script(
        Raw('S="$R/wheels"; mkdir -p "$S"; made=$?'),  # the wheels are read (drained) either way
        commands.receive(host.venv_from, Raw('"$S"'), sent),
        Raw('[ "$made" = 0 ] || exit 3'),
        Raw('rm -rf "$R/venv.new"'),
        line(host.venv_from, Raw('-m venv --without-pip "$R/venv.new" ||'),
             Raw('{ echo "python -m venv failed (Debian: apt-get install python3-venv)"; exit 3; }')),
        line(Raw('"$R/venv.new/bin/python" -c'), _INSTALL, *[Raw(f'"$S"/{line(n)}') for n in names],
             Raw("|| exit 3")),
        line(Raw("echo"), wanted, Raw('> "$R/venv.new/.fleet-wheels"')),
        Raw('rm -rf "$R/venv" && mv "$R/venv.new" "$R/venv" || exit 3'),
        # Wheels of earlier sets are no longer needed.
        line(Raw('for f in "$S"/*; do case'), " " + " ".join(names) + " ",
             Raw('in *" ${f##*/} "*) ;; *) rm -f "$f" ;; esac; done')),
    )


def requirements():
    """The services' runtime dependencies, from the installed services package's metadata."""
    import importlib.metadata  # only for venv hosts (~20 ms to import)

    try:
        required = importlib.metadata.requires(SERVICES_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise connection.ConnectFailed(f"venv: true needs the {SERVICES_DISTRIBUTION} package on the controller "
                                       "(pip install ./services)") from None
    return sorted(r for r in required if "extra ==" not in r)


def wheelhouse(platform, download=None):
    """Wheels of the services' dependencies for `platform`, fetched once into the cache
    (~/.cache/fleet/wheels/TAG-cpXY-HASH) and reused by every later run and host."""
    reqs = requirements()
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    directory = os.path.join(cache_dir(), "wheels", f"{platform.tag}-{platform.python}-{key}")
    try:
        fill_once(directory, lambda d: (download or _pip_download)(platform, reqs, d), WHEELS_FILL_WAIT_SECONDS)
    except Unavailable as e:  # another run's fetch outlasted the wait: this host cannot be prepared now
        raise connection.ConnectFailed(str(e)) from None
    paths = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".whl")]
    return [Wheel(source=p, name=f"{file_sha256(p)[:16]}-{os.path.basename(p)}") for p in paths]


def _pip_download(platform, reqs, directory):
    """pip download for the host's platform and Python, then again for what the downloaded
    wheels need on the host but pip left out (markers it judged by the controller's Python)."""
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".download-")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", *[arg for tag in platform.tags() for arg in ("--platform", tag)],
               "--python-version", platform.python, "--implementation", "cp", "-d", staging]
    try:
        _pip_rounds(command, reqs, staging, platform)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    open(os.path.join(staging, ".complete"), "w").close()
    os.replace(staging, directory)


def _pip_rounds(command, reqs, staging, platform):
    where = f"wheels for {platform.tag}, Python {platform.python}"
    for _ in range(PIP_ROUNDS):
        try:
            proc = subprocess.run(command + reqs, capture_output=True, text=True, timeout=PIP_SECONDS)
        except subprocess.TimeoutExpired:
            raise connection.ConnectFailed(f"pip download of {where} took over {PIP_SECONDS} s") from None
        if proc.returncode != 0:
            raise connection.ConnectFailed(f"cannot fetch {where}: {_last(proc.stderr + proc.stdout)}")
        reqs = _left_out(staging, platform.markers())
        if not reqs:
            return
    raise connection.ConnectFailed(f"cannot fetch {where}: pip left out {', '.join(reqs)} after {PIP_ROUNDS} rounds")


def _left_out(directory, environment):
    """Requirements of the wheels in `directory` that hold on the host and have no wheel there."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wheels = [f for f in os.listdir(directory) if f.endswith(".whl")]
    have = {canonicalize_name(f.split("-")[0]) for f in wheels}
    missing = []
    for wheel in wheels:
        with zipfile.ZipFile(os.path.join(directory, wheel)) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = email.parser.Parser().parsestr(z.read(name).decode("utf-8", "replace"))
        for text in metadata.get_all("Requires-Dist") or []:
            req = Requirement(text)
            if (req.marker is None or req.marker.evaluate(environment)) and canonicalize_name(req.name) not in have:
                missing.append(f"{req.name}{req.specifier}")
    return sorted(set(missing))
