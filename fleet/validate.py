"""`envoy --mode validate` on the controller, before any config is sent anywhere."""

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
    with ThreadPoolExecutor(max_workers=min(8, len(configs))) as pool:
        results = list(pool.map(lambda text: _validate(binary, text), configs))
    for (text, where), error in zip(configs.items(), results):
        if error:
            raise UsageError(mask(f"Envoy config rejected by `envoy --mode validate`: {error}"), key=where)


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
