"""Bounded input (issue 8, finding 7): oversized, alias-bomb, recursive and deeply nested YAML
is refused with one UsageError naming the file (and line), never expanded or overflowed."""

import pytest

from fleet import yamlsource
from fleet.errors import UsageError
from tests.conftest import load_inventory


def laughs(levels):
    """The 400-byte "billion laughs": each level a list of nine aliases of the one before."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nhosts: {}\nservices: {}\n"


def refused(tmp_path, text, name="inventory.yaml"):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_inventory(str(path))
    assert info.value.path == str(path)
    assert "\n" not in info.value.one_line()
    return info.value


@pytest.mark.parametrize("levels", [6, 7])
def test_alias_bomb_is_refused(tmp_path, levels):
    text = laughs(levels)
    assert len(text) < 500
    err = refused(tmp_path, text)
    assert "aliases expand to more than" in err.message and err.line is not None


def test_recursive_alias_is_refused(tmp_path):
    err = refused(tmp_path, "hosts: &h\n  a: *h\nservices: {}\n")
    assert "recursive YAML alias" in err.message and err.line == 2


@pytest.mark.parametrize("depth", [51, 900, 5000])
def test_deep_nesting_is_refused(tmp_path, depth):
    # libyaml's parser has a limit of its own (1000 flow levels), met first in the deepest case
    err = refused(tmp_path, "hosts: " + "[" * depth + "]" * depth + "\n")
    assert "nest" in err.message and err.line == 1
    err = refused(tmp_path, "".join(f"{' ' * i}k{i}:\n" for i in range(min(depth, 500))))
    assert err.message == "nested more than 50 levels deep" and err.line == 51


def test_oversized_file_is_refused(tmp_path):
    err = refused(tmp_path, "# padding\n" * 5_000_000)  # 50 MB
    assert "larger than 256 KiB" in err.message


def test_too_many_values_are_refused(tmp_path):
    err = refused(tmp_path, "hosts: [" + "a," * 60_000 + "]\n")  # 120 KB
    assert err.message == "more than 50000 values in one file" and err.line == 1


def test_a_character_yaml_forbids_is_one_line(tmp_path):
    err = refused(tmp_path, "hosts: {a: \x07}\n")
    assert err.message.startswith("invalid YAML: unacceptable character #x0007")


def test_modest_aliases_still_work():
    source = yamlsource.loads("base: &b {port: 1, tags: [x, y]}\ncopy: *b\n", "f.yaml")
    assert source.data["copy"] == {"port": 1, "tags": ["x", "y"]}
    assert source.line(("copy",)) == 2


def test_role_files_are_bounded_too(tmp_path):
    from fleet import roles
    role = tmp_path / "roles" / "bomb"
    role.mkdir(parents=True)
    (role / "tasks.yaml").write_text(laughs(6))
    with pytest.raises(UsageError, match="aliases expand"):
        roles.load_roles([str(tmp_path / "roles")])
