"""Runs stopped mid-write and runs racing for one output: SIGINT (Ctrl-C) and SIGTERM stop a run in one line (exit
130 and 143); an unfinished quantize output is kept for --resume (which then writes the same bytes as an
uninterrupted run) and any other is deleted; SIGKILL leaves the unfinished folder to the next run on OUT, which
continues or deletes it; nothing is ever published half-written. A second run on an OUT being written is refused
naming the first. BITSMITH_DEBUG=1 shows the traceback of an internal error, as --debug does.

Every run is the command line in a process of its own, forked from one that has imported bitsmith already."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import pytest
from hostile_support import refused, run, said, tree

from bitsmith.formats import faults
from bitsmith.formats.checkpoint import verify

RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32"]
GPTQ = ["--nsamples", "8", "--seqlen", "64", "--no-mse"]
KEEP = ("{out}: the unfinished output is kept in {partial}; run the same command with --resume to continue it (a run "
        "without --resume deletes it)")
STOPPED = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}

FORKER = textwrap.dedent("""
    import json, os, signal, sys
    import bitsmith.api
    from bitsmith.calibration.adapter import skeleton
    from bitsmith.cli.main import main
    skeleton(json.loads(sys.argv[1]))           # the model family's code imported too
    print("ready", flush=True)
    for line in sys.stdin:
        args, env, out, err = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.default_int_handler)       # Ctrl-C as in a terminal
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.environ.update(env)
            try:
                main(args, prog_name="bitsmith")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(pid, flush=True)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
""")


@dataclass
class Run:
    code: int
    stderr: str

    @property
    def lines(self) -> list[str]:
        """What a user reads on stderr, progress bars left out."""
        return said(self.stderr)


class Forker:
    """A process that has imported bitsmith and forks one child per `bitsmith` command: `start` it, then `wait`."""

    def __init__(self, folder, config: dict):
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, "-c", FORKER, json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def start(self, args: list, **env: str) -> int:
        """Start the command `args` with `env` added to its environment; its pid."""
        request = [[str(a) for a in args], env, str(self.folder / "stdout"), str(self.folder / "stderr")]
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> Run:
        return Run(int(self.proc.stdout.readline()), (self.folder / "stderr").read_text())

    def __call__(self, args: list, **env: str) -> Run:
        self.start(args, **env)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def bitsmith(tmp_path_factory, stories_path):
    forker = Forker(tmp_path_factory.mktemp("runs"), json.loads((stories_path / "config.json").read_text()))
    yield forker
    forker.close()


@pytest.fixture(scope="module")
def calib(tmp_path_factory, text_dir):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    shutil.copyfile(text_dir / "tinystories_calib.txt", path)
    return path


def stopped_at(point: str, sig: signal.Signals | None = None) -> dict[str, str]:
    """The environment that stops a run at a named point (formats/faults.py) with `sig` (default SIGKILL)."""
    return {faults.VARIABLE: point, faults.SIGNAL: sig.name if sig else ""}


def names(root) -> list[str]:
    """Every path under root, hidden ones included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def partial(out):
    (folder,) = out.parent.glob(f".{out.name}.*.partial")
    return folder


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def rtn_reference(tmp_path_factory, bitsmith, stories_path):
    out = tmp_path_factory.mktemp("rtn") / "out"
    assert bitsmith(["quantize", stories_path, "-o", out, *RTN]).code == 0
    return files(out)


@pytest.fixture(scope="module")
def gptq_reference(tmp_path_factory, bitsmith, stories_path, calib):
    out = tmp_path_factory.mktemp("gptq") / "out"
    assert bitsmith(["quantize", stories_path, "-o", out, "--calib", calib, *GPTQ]).code == 0
    return files(out)


# quantize: kept for --resume


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_quantize_stopped_mid_write_keeps_its_folder_for_resume(tmp_path, bitsmith, stories_path, rtn_reference,
                                                                sig):
    out = tmp_path / "out"
    args = ["quantize", stories_path, "-o", out, *RTN]
    stopped = bitsmith(args, **stopped_at("block:1", sig))
    kept = partial(out)
    assert (stopped.code, stopped.lines) == (128 + sig, [f"{STOPPED[sig]}: " + KEEP.format(out=out, partial=kept)])
    assert names(tmp_path) == [kept.name, f"{kept.name}/.journal", f"{kept.name}/.spool"]     # no lock, no OUT
    resumed = bitsmith([*args, "--resume"])
    assert (resumed.code, resumed.lines[:1]) == (0, [f"{out}: resuming the interrupted run, 2 of 5 blocks done"])
    assert files(out) == rtn_reference and os.listdir(tmp_path) == ["out"]


def test_quantize_killed_mid_write_leaves_its_folder_to_the_next_run(tmp_path, bitsmith, stories_path,
                                                                     rtn_reference):
    out = tmp_path / "out"
    args = ["quantize", stories_path, "-o", out, *RTN]
    killed = bitsmith(args, **stopped_at("block:1"))
    kept = partial(out)
    assert (killed.code, killed.lines) == (-signal.SIGKILL, [])
    assert names(tmp_path) == sorted([".out.lock", kept.name, f"{kept.name}/.journal", f"{kept.name}/.spool"])
    again = bitsmith(args)                                            # no --resume: the dead run's folder deleted
    assert again.code == 0, again.stderr
    assert files(out) == rtn_reference and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_from_outside_stops_quantize_in_one_line_and_resume_finishes_it(
        tmp_path, bitsmith, stories_path, calib, gptq_reference, sig):
    """Sent by another process once the first block is journaled, wherever the run is then (at the latest where
    the second block is journaled: the run waits there, so that the signal cannot come after it has ended)."""
    out = tmp_path / "out"
    args = ["quantize", stories_path, "-o", out, "--calib", calib, *GPTQ]
    pid = bitsmith.start(args, **{faults.VARIABLE: "block:1", faults.SIGNAL: "wait"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        journal = list(tmp_path.glob(".out.*.partial/.journal"))
        if journal and '"block":0' in journal[0].read_text():
            break
        time.sleep(0.01)
    os.kill(pid, sig)
    stopped = bitsmith.wait()
    kept = partial(out)
    assert (stopped.code, stopped.lines) == (128 + sig, [f"{STOPPED[sig]}: " + KEEP.format(out=out, partial=kept)])
    assert names(tmp_path) == [kept.name, f"{kept.name}/.journal", f"{kept.name}/.spool"]
    resumed = bitsmith([*args, "--resume"])
    assert resumed.code == 0, resumed.stderr
    assert resumed.lines[0].startswith(f"{out}: resuming the interrupted run, ")
    assert files(out) == gptq_reference and os.listdir(tmp_path) == ["out"]


@pytest.fixture
def ctrl_c():
    """Ctrl-C raising KeyboardInterrupt, as at a terminal, even where a shell started the tests in the background
    (which ignores SIGINT: the run would then finish instead of stopping)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_a_library_turns_into_its_own_error_still_stops_the_run(tmp_path, stories_path, monkeypatch,
                                                                             rtn_reference, ctrl_c):
    """safetensors can turn the KeyboardInterrupt a Ctrl-C raises inside its reading into an error of its own
    ("could not determine the shape of object type ..."): the run still stops as interrupted, kept for --resume,
    not as if the model file were unreadable (exit 2, the unfinished output deleted)."""
    from bitsmith.formats import checkpoint
    real = checkpoint.safe_open

    class Reader:                       # safe_open whose reading of layer 1 meets a Ctrl-C, as the library does
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, name):
            if name.startswith("model.layers.1."):
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                except KeyboardInterrupt:
                    raise TypeError("could not determine the shape of object type 'UntypedStorage'") from None
            return self.file.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", Reader)
    out = tmp_path / "out"
    args = ["quantize", stories_path, "-o", out, *RTN]
    stopped = run(*args)
    kept = partial(out)
    assert (stopped.exit_code, said(stopped.stderr)) == (130, ["interrupted: " + KEEP.format(out=out, partial=kept)])
    monkeypatch.setattr(checkpoint, "safe_open", real)
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert files(out) == rtn_reference and os.listdir(tmp_path) == ["out"]


# compress: nothing kept


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_compress_stopped_while_publishing_leaves_nothing(tmp_path, bitsmith, stories_path, sig):
    stopped = bitsmith(["compress", stories_path, "-o", tmp_path / "z"], **stopped_at("commit", sig))
    assert (stopped.code, stopped.lines) == (128 + sig, [STOPPED[sig]])
    assert os.listdir(tmp_path) == []


def test_compress_killed_while_publishing_leaves_its_folder_to_the_next_run(tmp_path, bitsmith, stories_path):
    args = ["compress", stories_path, "-o", tmp_path / "z"]
    killed = bitsmith(args, **stopped_at("commit"))
    kept = partial(tmp_path / "z")
    assert killed.code == -signal.SIGKILL
    assert ".z.lock" in os.listdir(tmp_path) and (kept / "model.safetensors").exists()
    assert not (tmp_path / "z").exists()                              # never published half-written
    assert bitsmith(args).code == 0
    assert os.listdir(tmp_path) == ["z"] and verify(tmp_path / "z") == []


# two runs, one output


def test_a_second_run_on_an_output_being_written_is_refused_naming_the_first(tmp_path, bitsmith, stories_path,
                                                                              calib):
    out = tmp_path / "out"
    pid = bitsmith.start(["quantize", stories_path, "-o", out, "--calib", calib, *GPTQ])
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.partial/.journal")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGSTOP)                                       # holding the lock, mid-write
    try:
        before = tree(tmp_path)
        for args in (["quantize", stories_path, "-o", out, *RTN], ["compress", stories_path, "-o", out, "--overwrite"]):
            r = run(*args)
            assert r.exit_code == 2 and r.stdout == "", r.output
            (line,) = said(r.stderr)
            assert line.startswith(f"error: {out}: is being written by pid {pid} on {socket.gethostname()} since ")
        assert tree(tmp_path) == before
    finally:
        os.kill(pid, signal.SIGCONT)
    assert bitsmith.wait().code == 0
    assert os.listdir(tmp_path) == ["out"] and verify(out) == []


# exit 1 is for bugs; BITSMITH_DEBUG=1 shows their traceback


def test_debug_from_the_environment_shows_the_traceback(tmp_path, stories_path, monkeypatch):
    from click.testing import CliRunner

    from bitsmith import api
    from bitsmith.cli.main import main

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(api, "quantize", broken)
    args = ["quantize", str(stories_path), "-o", str(tmp_path / "out"), *RTN]
    r = CliRunner().invoke(main, args, env={"BITSMITH_DEBUG": "1"})
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)           # raised on, as a traceback
    refused(CliRunner().invoke(main, args, env={"BITSMITH_DEBUG": "0"}),
            "internal error: RuntimeError: a bug (rerun with --debug for the traceback)", code=1)
    assert os.listdir(tmp_path) == []
