"""`envoy --mode validate` on the controller, before any config is sent anywhere."""

import hashlib
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

from fleet import artifacts
from fleet.errors import UsageError

_LOG_PREFIX = re.compile(r"^(\[[^\]]*\])+ (\[[^\]]*\] )?")


def validate_envoy_configs(states, envoy_binary=None, mask=str):
    """Validates each distinct rendered config once; raises UsageError naming the first bad one."""
    configs = {}
    for state in states.values():
        for label, text in state.envoy_validations:
            configs.setdefault(text, f"{label} on {state.host.name}")
    if not configs:
        return
    binary = envoy_binary or artifacts.resolve("builtin:envoy", ".").path
    # A config this same Envoy accepted before is not validated again (a marker per accepted
    # config and binary in the cache); rejections are never remembered.
    accepted = os.path.join(artifacts.cache_dir(), "envoy-validated")
    marker = {text: os.path.join(accepted, hashlib.sha256(
        f"{artifacts.file_sha256(binary)}\0{text}".encode()).hexdigest()) for text in configs}
    pending = [text for text in configs if not os.path.exists(marker[text])]
    if not pending:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(pending))) as pool:
        results = dict(zip(pending, pool.map(lambda text: _validate(binary, text), pending)))
    for text, where in configs.items():
        if results.get(text):
            raise UsageError(mask(f"Envoy config rejected by `envoy --mode validate`: {results[text]}"), key=where)
    for text in pending:
        artifacts.write_cache_file(marker[text], b"")


def _validate(binary, text):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        proc = subprocess.run([binary, "--mode", "validate", "-c", f.name, "--log-level", "error"],
                              capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    if proc.returncode == 0:
        return None
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    # Drop Envoy's "[time][thread][level][logger] [source:line] " prefix: the reason is what matters.
    reason = _LOG_PREFIX.sub("", lines[-1]) if lines else f"exit code {proc.returncode}"
    # Envoy appends the whole config as JSON to some errors: the reason comes before it.
    return reason.split(": {", 1)[0] if len(reason) > 300 else reason
