"""Every Envoy config fleet renders passes `envoy --mode validate` with the real binary."""

import hashlib
import os
import subprocess

import pytest

from fleet import artifacts, desired, validate
from fleet.errors import UsageError
from tests.conftest import REPO, load_inventory, project

INVENTORIES = ["seed.yaml", "local.yaml"]


@pytest.mark.parametrize("name", INVENTORIES)
def test_rendered_envoy_configs_validate(name):
    inv = load_inventory(os.path.join(REPO, "inventory", name))
    states = desired.compile_services(inv, list(inv.services.values()), project())
    texts = [text for state in states.values() for _, text in state.envoy_validations]
    assert texts
    validate.validate_envoy_configs(states)  # raises on the first rejected config


def test_dynamic_bootstrap_itself_loads(tmp_path):
    """The bootstrap Envoy really runs with (file-based LDS/CDS) is valid too."""
    text = open(os.path.join(REPO, "inventory", "seed.yaml")).read().replace("root: /opt/fleet", f"root: {tmp_path}")
    (tmp_path / "inv.yaml").write_text(text)
    inv = load_inventory(str(tmp_path / "inv.yaml"))
    states = desired.compile_services(inv, [inv.service("inference")], project())
    for spec in states["node109"].files:
        if spec.content is not None and "/envoy/" in spec.path:
            os.makedirs(os.path.dirname(spec.path), exist_ok=True)
            with open(spec.path, "wb") as f:
                f.write(spec.content)
    boot = next(f for f in states["node109"].files if f.path.endswith("bootstrap.yaml"))
    binary = artifacts.resolve("builtin:envoy", ".").path
    proc = subprocess.run([binary, "--mode", "validate", "-c", boot.path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_broken_config_is_refused_before_any_host(tmp_path):
    inv = load_inventory(os.path.join(REPO, "inventory", "seed.yaml"))
    states = desired.compile_services(inv, [inv.service("inference")], project())
    label, text = states["node109"].envoy_validations[0]
    states["node109"].envoy_validations[0] = (label, text.replace("ROUND_ROBIN", "ROUND_AND_ROUND"))
    with pytest.raises(UsageError) as info:
        validate.validate_envoy_configs(states)
    assert info.value.key == "inference.envoy.config on node109"
    assert info.value.message.startswith("Envoy config rejected by `envoy --mode validate`: error initializing")
    assert "ROUND_AND_ROUND" in info.value.message


def test_original_sample_configs_are_rejected():
    """Why fleet renders its own: the seed's samples do not load on Envoy 1.40 (see reference)."""
    samples = os.path.join(REPO, "tests", "data", "original-envoy-configs")  # copied from the reference
    binary = artifacts.resolve("builtin:envoy", ".").path
    for name in sorted(os.listdir(samples)):
        proc = subprocess.run([binary, "--mode", "validate", "-c", os.path.join(samples, name)], capture_output=True)
        assert proc.returncode != 0, name


def _seed_states():
    inv = load_inventory(os.path.join(REPO, "inventory", "seed.yaml"))
    return desired.compile_services(inv, [inv.service("inference")], project())


def _counting_validations(monkeypatch):
    """Counts the real `envoy --mode validate` runs (each still runs)."""
    calls = []
    real = validate._validate

    def counted(binary, text):
        calls.append(text)
        return real(binary, text)

    monkeypatch.setattr(validate, "_validate", counted)
    return calls


def test_an_accepted_config_is_not_validated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = _counting_validations(monkeypatch)
    validate.validate_envoy_configs(_seed_states())
    first = len(calls)
    validate.validate_envoy_configs(_seed_states())
    assert first >= 1 and len(calls) == first
    # Another binary (here: the same bytes under another identity) validates again.
    binary = tmp_path / "envoy"
    binary.write_bytes(b"not the same binary")
    monkeypatch.setattr(validate, "_validate", lambda b, text: calls.append(b) or None)
    validate.validate_envoy_configs(_seed_states(), envoy_binary=str(binary))
    assert calls[-1] == str(binary)


def test_a_rejected_config_is_rejected_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = _counting_validations(monkeypatch)
    for attempt in (1, 2):
        states = _seed_states()
        label, text = states["node109"].envoy_validations[0]
        states["node109"].envoy_validations[0] = (label, text.replace("ROUND_ROBIN", "ROUND_AND_ROUND"))
        with pytest.raises(UsageError):
            validate.validate_envoy_configs(states)
        assert len(calls) == attempt


def test_a_file_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    remembered = tmp_path / "cache" / "fleet" / "sha256"
    envoy = artifacts.resolve("builtin:envoy", ".").path  # installed long ago: remembered
    artifacts.stamped_sha256.cache_clear()
    digest = artifacts.file_sha256(envoy)
    assert len(os.listdir(remembered)) == 1
    (entry,) = os.listdir(remembered)
    (remembered / entry).write_text("f" * 64)  # what the cache says is what a later run gets
    artifacts.stamped_sha256.cache_clear()
    assert artifacts.file_sha256(envoy) == "f" * 64 != digest
    # A file written just now is hashed every time, even rewritten with its size and mtime kept.
    path = tmp_path / "artifact.bin"
    path.write_bytes(b"a" * 1000)
    artifacts.stamped_sha256.cache_clear()
    assert artifacts.file_sha256(str(path)) == hashlib.sha256(b"a" * 1000).hexdigest()
    stat = os.stat(path)
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    artifacts.stamped_sha256.cache_clear()
    assert artifacts.file_sha256(str(path)) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(os.listdir(remembered)) == 1
