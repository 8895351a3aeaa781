"""Fresh hosts, the controller's part without hosts: platform tags, and the dependencies pip
leaves out when it judges markers by the controller's Python."""

import io
import zipfile

import pytest

from fleet.connection import ConnectFailed
from fleet.hostenv import PIP_ROUNDS, Platform, _left_out, _pip_rounds


def test_platform_tags_go_down_to_manylinux2014():
    tags = Platform("aarch64", "glibc", "2.19", "3.11.2").tags()
    assert tags == ["manylinux_2_19_aarch64", "manylinux_2_18_aarch64", "manylinux_2_17_aarch64",
                    "manylinux2014_aarch64"]
    assert Platform("x86_64", "musl", "1.2", "3.12.1").tags() == ["musllinux_1_2_x86_64", "musllinux_1_1_x86_64"]


def wheel(directory, name, requires):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (directory / f"{name}-1.0-py3-none-any.whl").write_bytes(buffer.getvalue())


def test_left_out_requirements_are_judged_by_the_hosts_python(tmp_path):
    wheel(tmp_path, "redis", ['async-timeout>=4.0.3; python_full_version < "3.11.3"', "typing_extensions",
                              'hiredis>=1; extra == "hiredis"'])
    wheel(tmp_path, "typing_extensions", [])
    host = Platform("x86_64", "glibc", "2.36", "3.11.2")
    assert _left_out(str(tmp_path), host.markers()) == ["async-timeout>=4.0.3"]
    newer = Platform("x86_64", "glibc", "2.36", "3.12.1")
    assert _left_out(str(tmp_path), newer.markers()) == []


def test_pip_rounds_are_bounded_when_pip_never_fetches_what_was_left_out(tmp_path):
    """A wheel needs `ghost`, which every round asks for and no round brings (here `true` stands
    for a pip that succeeds and fetches nothing): after PIP_ROUNDS rounds it stops, naming it."""
    wheel(tmp_path, "needs_ghost", ["ghost>=1"])
    with pytest.raises(ConnectFailed) as raised:
        _pip_rounds(["true"], ["needs_ghost"], str(tmp_path), Platform("x86_64", "glibc", "2.36", "3.11.2"))
    assert str(raised.value) == (f"cannot fetch wheels for manylinux_2_36_x86_64, Python 3.11.2: pip left out "
                                 f"ghost>=1 after {PIP_ROUNDS} rounds")
