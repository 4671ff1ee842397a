"""The writer's journal: a killed writer's folder is continued by a resuming writer exactly up to its last
journal entry (tensors, saved files), deleted by any other writer, and never continued past a torn entry."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bitsmith.formats.checkpoint import CheckpointWriter
from bitsmith.formats.errors import InputError
from bitsmith.formats.journal import Journal
from bitsmith.formats.output import ResumeRefused


def partials(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".partial"))


def killed(out, steps: int, extra: bool = True):
    """A writer that journaled `steps` tensors (plus one more not journaled, with `extra`), then died: its lock
    is free, its folder left as it was."""
    w = CheckpointWriter(out)
    w.record({"identity": "x"})
    for i in range(steps):
        w.add(f"t{i}", torch.full((3,), float(i)))
        w.record({"step": i})
    if extra:
        w.add("late", torch.ones(5))
        (w.tmp / "side.txt").write_text("not journaled")
    w.release()
    return w.tmp


def test_journal_cuts_a_torn_entry(tmp_path):
    journal = Journal(tmp_path)
    journal.append({"a": 1})
    journal.append({"b": 2})
    journal.close()
    with open(journal.path, "ab") as f:
        f.write(b'{"c": 3')                          # killed while writing
    assert journal.read() == [{"a": 1}, {"b": 2}]
    assert journal.path.read_bytes().count(b"\n") == 2 and journal.path.read_bytes().endswith(b"\n")


def test_resumed_writer_continues_after_the_last_entry_and_writes_the_same_bytes(tmp_path):
    with CheckpointWriter(tmp_path / "whole") as w:
        for i in range(3):
            w.add(f"t{i}", torch.full((3,), float(i)))
        w.commit(None, {})
    folder = killed(tmp_path / "out", 2)
    w = CheckpointWriter(tmp_path / "out", resume=True)
    assert w.tmp == folder
    assert [e for e in w.resumed if "step" in e] == [{"step": 0}, {"step": 1}]
    assert sorted(p.name for p in folder.iterdir()) == [".journal", ".spool"]      # the unjournaled file is gone
    assert torch.equal(w.get("t1"), torch.full((3,), 1.0))
    w.add("t2", torch.full((3,), 2.0))                                             # "late" was never written
    w.commit(None, {})
    for name in ("model.safetensors", "bitsmith_manifest.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole"]


def test_writer_without_resume_deletes_the_killed_writers_folder(tmp_path):
    folder = killed(tmp_path / "out", 2)
    with CheckpointWriter(tmp_path / "out") as w:
        assert not folder.exists() and w.resumed == []
        w.add("x", torch.ones(1))
        w.commit(None, {})
    assert load_file(str(tmp_path / "out" / "model.safetensors")).keys() == {"x"}


def test_newest_journaled_folder_is_continued_and_the_others_deleted(tmp_path):
    newer = killed(tmp_path / "out", 2)
    older = tmp_path / ".out.older.partial"
    shutil.copytree(newer, older)
    os.utime(older / ".journal", ns=(0, 0))
    plain = tmp_path / ".out.plain.partial"                    # a writer that journaled nothing
    plain.mkdir()
    (plain / ".spool").write_bytes(b"x")
    w = CheckpointWriter(tmp_path / "out", resume=True)
    assert w.tmp == newer and partials(tmp_path) == [newer]
    w.abort()


def test_spool_shorter_than_the_journal_leaves_nothing_to_continue(tmp_path):
    folder = killed(tmp_path / "out", 2)
    spool = folder / ".spool"
    spool.write_bytes(spool.read_bytes()[:10])
    w = CheckpointWriter(tmp_path / "out", resume=True)
    assert w.resumed == [] and list(folder.iterdir()) == []
    w.abort()


def test_saved_files_are_kept_and_side_files_added_later_are_not(tmp_path):
    w = CheckpointWriter(tmp_path / "out")
    w.record({"identity": "x"})
    w.save_file("measurement.json", b"{}\n")
    w.add_file("plan.json", b"{}\n")
    w.release()
    w = CheckpointWriter(tmp_path / "out", resume=True)
    assert w.saved("measurement.json").read_bytes() == b"{}\n" and w.saved("plan.json") is None
    assert w.resumed == [{"identity": "x"}, {"file": "measurement.json"}]
    w.abort()


def test_refusal_to_resume_keeps_the_folder_and_unlocks(tmp_path):
    folder = killed(tmp_path / "out", 2, extra=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ResumeRefused), CheckpointWriter(tmp_path / "out", resume=True):
        raise ResumeRefused("other inputs")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]          # no lock held
    with pytest.raises(ValueError), CheckpointWriter(tmp_path / "out", resume=True):
        raise ValueError("a failure of the run itself")
    assert list(tmp_path.iterdir()) == []


def test_resuming_writer_is_refused_while_another_writes(tmp_path):
    first = CheckpointWriter(tmp_path / "out")
    first.record({"identity": "x"})
    with pytest.raises(InputError, match="is being written by"):
        CheckpointWriter(tmp_path / "out", resume=True)
    assert partials(tmp_path) == [first.tmp]
    first.abort()


def test_journal_entries_name_their_tensors(tmp_path):
    w = CheckpointWriter(tmp_path / "out")
    w.add("a", torch.zeros(2, dtype=torch.int32))
    w.record({"step": 0})
    entry = json.loads((w.tmp / ".journal").read_text())
    assert entry == {"step": 0, "tensors": [["a", "I32", [2], 0, 8]], "spool": 8}
    w.abort()


def test_replaced_tensor_is_written_last_and_a_resumed_writer_takes_what_the_journal_holds(tmp_path):
    def fill(out, replaced: float, record_replacement: bool = True):
        w = CheckpointWriter(out, resume=True)
        for i in range(3):
            w.add(f"t{i}", torch.full((3,), float(i)))
            w.record({"step": i})
        w.replace("t0", torch.full((3,), replaced))
        if record_replacement:
            w.record({"replaced": True})
        return w

    w = fill(tmp_path / "whole", 9.0)
    assert w.holds("t0") and not w.holds("t9") and torch.equal(w.get("t0"), torch.full((3,), 9.0))
    with pytest.raises(ValueError, match=r"must be F32 \[3\]"):
        w.replace("t1", torch.zeros(4))
    w.commit(None, {})
    whole = tmp_path / "whole" / "model.safetensors"
    assert list(load_file(str(whole))) == ["t1", "t2", "t0"]             # laid out in the order last added
    assert torch.equal(load_file(str(whole))["t0"], torch.full((3,), 9.0))
    fill(tmp_path / "out", 9.0).release()                                # killed after the replacement's entry
    w = CheckpointWriter(tmp_path / "out", resume=True)
    assert torch.equal(w.get("t0"), torch.full((3,), 9.0))
    w.commit(None, {})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == whole.read_bytes()
    fill(tmp_path / "late", 5.0, record_replacement=False).release()     # killed before it: the tensor as journaled
    w = CheckpointWriter(tmp_path / "late", resume=True)
    assert torch.equal(w.get("t0"), torch.zeros(3)) and list(w._entries) == ["t0", "t1", "t2"]
    w.replace("t0", torch.full((3,), 9.0))
    w.commit(None, {})
    assert (tmp_path / "late" / "model.safetensors").read_bytes() == whole.read_bytes()


def test_planned_writer_replaces_nothing(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        w.plan([("x", "F32", [1])])
        w.add("x", torch.ones(1))
        with pytest.raises(ValueError, match="nothing in it is replaced"):
            w.replace("x", torch.zeros(1))
        w.abort()
