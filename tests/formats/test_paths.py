"""Names read from files become paths only as plain relative paths inside their folder."""
from __future__ import annotations

import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats.errors import InputError
from bitsmith.formats.paths import check_folder, inside, plain


@pytest.mark.parametrize("name", ["model.safetensors", "1_Pooling/config.json", "a..b", "..a/b..", "a b/c-d_e.json"])
def test_plain_names_pass(name):
    assert plain(name, "index") == name


@pytest.mark.parametrize("name, problem", [
    ("../x", "'../x' climbs out of the folder (a '..' part)"),
    ("a/../../b", "'a/../../b' climbs out of the folder (a '..' part)"),
    ("..", "'..' climbs out of the folder (a '..' part)"),
    ("/etc/passwd", "'/etc/passwd' is an absolute path (names are relative to the folder)"),
    ("C:x", "'C:x' is an absolute path (names are relative to the folder)"),
    ("a\\..\\b", "'a\\\\..\\\\b' holds a backslash (names are POSIX paths)"),
    ("a\0b", "'a\\x00b' holds a control character"),
    ("a\nb", "'a\\nb' holds a control character"),
    ("", "'' is an empty file name"),
    ("a//b", "'a//b' has an empty or '.' part (not a plain relative path)"),
    ("./a", "'./a' has an empty or '.' part (not a plain relative path)"),
    ("a/", "'a/' has an empty or '.' part (not a plain relative path)"),
    (7, "7 is not a file name"),
    (None, "None is not a file name"),
])
def test_other_names_are_refused_naming_where_they_were_read(name, problem):
    with pytest.raises(InputError) as e:
        plain(name, "m.json files")
    assert str(e.value) == f"m.json files: {problem}"
    assert "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("ab./\\:\0\n"), max_size=12) | st.text(max_size=12))
def test_a_plain_name_stays_inside_whatever_it_holds(name):
    try:
        plain(name, "fuzz")
    except InputError:
        return
    normal = posixpath.normpath(name)
    assert normal == name and not normal.startswith("/") and ".." not in normal.split("/") and "\\" not in name


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "secret").write_text("outside")
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "real.json").write_text("{}")
    return folder


def test_links_inside_the_folder_are_followed(folder):
    (folder / "alias.json").symlink_to("sub/real.json")
    (folder / "here").symlink_to("sub")
    assert inside(folder, "alias.json", "index").read_text() == "{}"
    assert inside(folder, "here/real.json", "index") == folder / "here" / "real.json"
    check_folder(folder)


@pytest.mark.parametrize("link, target, name", [
    ("tokenizer.json", "../secret", "tokenizer.json"),
    ("abs.json", "{tmp}/secret", "abs.json"),
    ("up", "..", "up/secret"),
    ("sub/deep.json", "../../secret", "sub/deep.json"),
])
def test_links_out_of_the_folder_are_refused(folder, link, target, name):
    (folder / link).symlink_to(target.format(tmp=folder.parent))
    advice = "copy the folder with its links resolved to use it"
    secret = (folder.parent / "secret").resolve()
    with pytest.raises(InputError) as e:
        inside(folder, name, "index")
    assert str(e.value) == f"index: '{name}' is a symbolic link out of the folder (to {secret}); {advice}"
    with pytest.raises(InputError) as e:
        check_folder(folder)
    to = (folder / link).resolve()
    assert str(e.value) == f"{folder}: '{link}' is a symbolic link out of the folder (to {to}); {advice}"


def test_a_link_loop_is_refused(folder):
    (folder / "loop").symlink_to("loop")
    with pytest.raises(InputError, match="^index: 'loop' cannot be resolved"):
        inside(folder, "loop", "index")
