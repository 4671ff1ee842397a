"""Output folders: OUT apart from the input, locked for the run, published or replaced without a moment when
neither the old nor the new folder is there, unfinished folders of dead runs never published."""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from bitsmith.formats import output
from bitsmith.formats.checkpoint import CheckpointWriter
from bitsmith.formats.errors import InputError


def tree(root):
    """Every path under root -> its bytes (None for a folder): the exact state of the disk."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


def names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def written(out, value: float, overwrite: bool = False):
    with CheckpointWriter(out, overwrite=overwrite) as w:
        w.add("x", torch.full((4,), value))
        w.commit(None, {})


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("out, message", [
    ("model", "{out}: the output may not be the input itself"),
    ("model/q", "{out}: the output may not lie inside the input {model}"),
    ("model/a/b", "{out}: the output may not lie inside the input {model}"),
    (".", "{out}: the output may not contain the input {model}"),
    ("model/../model/", "{out}: the output may not be the input itself"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_overlapping_the_input_is_refused_before_anything_is_created(tmp_path, model, out, message,
                                                                              overwrite):
    before = tree(tmp_path)
    out = tmp_path / out
    with pytest.raises(InputError) as e:
        CheckpointWriter(out, overwrite=overwrite, inputs=[model])
    assert str(e.value) == message.format(out=out, model=model)
    assert tree(tmp_path) == before


def test_overlap_compares_real_paths(tmp_path, model):
    (tmp_path / "alias").symlink_to(model)
    with pytest.raises(InputError, match="may not be the input itself"):
        CheckpointWriter(tmp_path / "alias", overwrite=True, inputs=[model])
    with pytest.raises(InputError, match="may not lie inside the input"):
        CheckpointWriter(model / "q", inputs=[tmp_path / "alias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "model"]


def test_gguf_file_input(tmp_path):
    gguf = tmp_path / "m" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="may not be the input itself"):
        CheckpointWriter(gguf, overwrite=True, inputs=[gguf])
    with pytest.raises(InputError, match="may not contain the input"):
        CheckpointWriter(tmp_path / "m", overwrite=True, inputs=[gguf])
    written(tmp_path / "m" / "q", 1.0)                  # beside the file is fine
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["model.gguf", "q"]


def test_second_writer_of_the_same_output_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    first = CheckpointWriter(out)
    with pytest.raises(InputError) as e:
        CheckpointWriter(out)
    assert str(e.value).startswith(f"{out}: is being written by pid {os.getpid()} on {socket.gethostname()} since ")
    (tmp_path / "alias").symlink_to(tmp_path)
    with pytest.raises(InputError, match="is being written by"):
        CheckpointWriter(tmp_path / "alias" / "out", overwrite=True)   # the same OUT, through a link
    first.add("x", torch.ones(2))
    first.commit(None, {})
    assert names(tmp_path) == {"alias", "out"}                          # the lock file is gone too
    written(tmp_path / "out", 2.0, overwrite=True)                   # and the lock is free again
    assert torch.equal(load_file(str(out / "model.safetensors"))["x"], torch.full((4,), 2.0))


HOLDER = textwrap.dedent("""
    import os, sys, torch
    from bitsmith.formats.checkpoint import CheckpointWriter
    w = CheckpointWriter(sys.argv[1], overwrite=True)
    w.add("x", torch.ones(1000))
    print(os.path.basename(w.tmp), flush=True)
    sys.stdin.readline()
    w.abort()
""")


def holder(out):
    """A writer in another process, holding the lock on `out` until its stdin is closed; its temp folder."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def test_writer_in_another_process_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    written(out, 1.0)
    before = tree(tmp_path / "out")
    proc, tmp = holder(out)
    try:
        with pytest.raises(InputError) as e:
            CheckpointWriter(out, overwrite=True)
        assert str(e.value).startswith(f"{out}: is being written by pid {proc.pid} on {socket.gethostname()} since ")
        assert names(tmp_path) == {".out.lock", tmp, "out"}          # its files untouched
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert tree(tmp_path / "out") == before


def test_stale_partial_of_a_killed_writer_is_deleted_and_never_published(tmp_path):
    out = tmp_path / "out"
    proc, tmp = holder(out)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert names(tmp_path) == {".out.lock", tmp}
    assert names(tmp_path / tmp) == {".spool"}
    with CheckpointWriter(out) as w:                   # the lock is free: its writer is dead
        assert names(tmp_path) == {".out.lock", w.tmp.name}
        w.abort()
    assert list(tmp_path.iterdir()) == []
    written(out, 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["bitsmith_manifest.json", "model.safetensors"]


def test_unfinished_folders_of_other_outputs_are_left_alone(tmp_path):
    """`.out.v2.XXXX.partial` belongs to OUT `out.v2`, maybe being written right now, not to `out`."""
    other = tmp_path / ".out.v2.abcd1234.partial"
    other.mkdir()
    written(tmp_path / "out", 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.v2.abcd1234.partial", "out"]


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    written(out, 1.0)
    before = tree(tmp_path)
    with pytest.raises(RuntimeError), CheckpointWriter(out, overwrite=True) as w:
        w.add("x", torch.zeros(4))
        raise RuntimeError("failed before commit")
    assert tree(tmp_path) == before


def exchange_available(tmp_path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    available = output._renameat2(a, b, output.RENAME_EXCHANGE)
    a.rmdir()
    b.rmdir()
    return available


def test_overwrite_swaps_the_folders_in_one_step(tmp_path, monkeypatch):
    if not exchange_available(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    out = tmp_path / "out"
    written(out, 1.0)

    def no_rename(src, dst):
        raise AssertionError(f"rename {src} -> {dst}: the swap should need none")
    monkeypatch.setattr(os, "rename", no_rename)
    written(out, 2.0, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["x"], torch.full((4,), 2.0))


def test_overwrite_without_the_swap_renames_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    written(out, 1.0)
    written(out, 2.0, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["x"], torch.full((4,), 2.0))


CRASH_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys, torch
    from bitsmith.formats import output
    from bitsmith.formats.checkpoint import CheckpointWriter
    output._renameat2 = lambda src, dst, flags: False
    rename = os.rename
    def rename_then_die(src, dst):
        rename(src, dst)
        if os.path.basename(dst) == "old":
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename_then_die
    w = CheckpointWriter(sys.argv[1], overwrite=True)
    w.add("x", torch.zeros(4))
    w.commit(None, {})
""")


@pytest.mark.parametrize("overwrite", [False, True])
def test_crash_between_the_two_renames_is_undone_by_the_next_writer(tmp_path, overwrite):
    out = tmp_path / "out"
    written(out, 1.0)
    before, old = tree(tmp_path), tree(out)
    proc = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(out)], check=False)
    assert proc.returncode == -signal.SIGKILL
    (trash,), (partial,) = tmp_path.glob(".out.*.old"), tmp_path.glob(".out.*.partial")
    assert names(tmp_path) == {".out.lock", trash.name, partial.name} and not out.exists()
    assert names(trash) == {"old"} and tree(trash / "old") == old
    if not overwrite:
        with pytest.raises(InputError, match="output already exists"):
            CheckpointWriter(out)
        assert tree(tmp_path) == before
    else:
        written(out, 2.0, overwrite=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert torch.equal(load_file(str(out / "model.safetensors"))["x"], torch.full((4,), 2.0))


def test_published_folder_has_the_mode_of_a_plain_mkdir(tmp_path):
    mask = os.umask(0o022)
    try:
        written(tmp_path / "out", 1.0)
        written(tmp_path / "out", 2.0, overwrite=True)
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_lock_file_unlinked_between_open_and_flock_is_not_trusted(tmp_path, monkeypatch):
    """The holder releases (unlinks) after a newcomer opened the file but before it locked it: the newcomer
    locks a file no other process can find, so it must open the path again."""
    path = tmp_path / ".out.lock"
    first = output.Lock(path, "out")
    flock = fcntl.flock

    def release_first_then_flock(fd, op):
        first.release()
        monkeypatch.setattr(fcntl, "flock", flock)
        flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", release_first_then_flock)
    second = output.Lock(path, "out")
    assert os.path.samestat(os.stat(path), os.fstat(second.fd))
    with pytest.raises(InputError, match=f"out: is being written by pid {os.getpid()}"):
        output.Lock(path, "out")
    second.release()
    assert list(tmp_path.iterdir()) == []
