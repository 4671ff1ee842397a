"""`bitsmith quantize --resume`: a run killed (SIGKILL) inside a block, after a block, before its measurement is
saved or while publishing continues from its last finished block and publishes the same bytes as an
uninterrupted run; a --target-bpw run does not measure again once its measurement is saved; a run with other
inputs is refused in one line (exit 2), the unfinished folder left as it was; with nothing to resume, a run
starts fresh and says so.

Every run is the command line in a process of its own, killed at named points (formats/faults.py). The
processes are forked from one that has imported bitsmith already, so that a run costs its work, not the start
of Python."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from bitsmith.formats import faults
from bitsmith.formats.output import ResumeRefused
from bitsmith.plan import LayerPlan, QuantizeOptions, QuantPlan
from bitsmith.resume import check_plan

GPTQ = ["--nsamples", "8", "--seqlen", "64", "--no-mse"]
TARGET = [*GPTQ, "--target-bpw", "4.5", "--fisher-samples", "2"]

FORKER = textwrap.dedent("""
    import json, os, sys
    import bitsmith.api
    from bitsmith.calibration.adapter import skeleton
    from bitsmith.cli.main import main
    skeleton(json.loads(sys.argv[1]))           # the model family's code imported too
    print("ready", flush=True)
    for line in sys.stdin:
        args, env, out, err = json.loads(line)
        pid = os.fork()
        if pid == 0:
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
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
""")


@dataclass
class Run:
    code: int
    stderr: str

    @property
    def notes(self) -> list[str]:
        """The lines on stderr, progress bars left out."""
        return [line for line in self.stderr.splitlines() if line.strip() and "|" not in line]


class Forker:
    """A process that has imported bitsmith and forks one child per `bitsmith` command."""

    def __init__(self, folder, config: dict):
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, "-c", FORKER, json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def __call__(self, args: list, kill: str = "") -> Run:
        """The command `args`; `kill`: the point where it is killed (none when empty)."""
        out, err = self.folder / "stdout", self.folder / "stderr"
        request = [[str(a) for a in args], {faults.VARIABLE: kill}, str(out), str(err)]
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return Run(int(self.proc.stdout.readline()), err.read_text())

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


def quantize(model, out, calib, *options) -> list:
    return ["quantize", model, "-o", out, "--calib", calib, *options]


def killed(bitsmith, args: list, at: str) -> list[str]:
    """Run `args`, killed at `at`; the notes it wrote on stderr."""
    run = bitsmith(args, kill=at)
    assert run.code == -signal.SIGKILL, run.stderr
    return run.notes


def finished(bitsmith, args: list) -> list[str]:
    run = bitsmith(args)
    assert run.code == 0, run.stderr
    return run.notes


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def partial(out):
    """The unfinished folder beside `out`."""
    (folder,) = out.parent.glob(f".{out.name}.*.partial")
    return folder


def resuming(out, done: int) -> str:
    return f"{out}: resuming the interrupted run, {done} of 5 blocks done"


def refused(out, reason: str) -> str:
    return f"error: {out}: cannot resume: {reason} (run without --resume to start over)"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bitsmith, stories_path, calib):
    """The files of an uninterrupted GPTQ run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    finished(bitsmith, quantize(stories_path, out, calib, *GPTQ))
    return files(out)


@pytest.mark.slow
def test_run_killed_inside_a_block_after_a_block_and_while_publishing_resumes_to_the_same_files(
        tmp_path, bitsmith, stories_path, calib, reference):
    out = tmp_path / "out"
    args = quantize(stories_path, out, calib, *GPTQ, "--resume")
    assert killed(bitsmith, args, at="tensors:1") == [f"{out}: nothing to resume, starting fresh"]
    assert sorted(p.name for p in partial(out).iterdir()) == [".journal", ".spool"]
    assert killed(bitsmith, args, at="block:3") == [resuming(out, 1)]          # block 1 is quantized again
    assert killed(bitsmith, args, at="commit") == [resuming(out, 4)]
    assert finished(bitsmith, args) == [resuming(out, 5)]
    assert files(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_resume_with_other_inputs_is_refused_in_one_line_and_keeps_the_folder(
        tmp_path, bitsmith, stories_path, stories_bf16, calib, text_dir, reference):
    out = tmp_path / "out"
    killed(bitsmith, quantize(stories_path, out, calib, *GPTQ), at="block:0")
    before, text = files(partial(out)), calib.read_bytes()
    refusals = [(stories_path, ["--seed", "1"], None, "this run has --seed 1, the interrupted one had --seed 0"),
                (stories_bf16, [], None, "the model differs from the interrupted run's (sha256 of its files)"),
                (stories_path, [], "wiki_calib.txt",
                 "the calibration text differs from the interrupted run's (sha256 of the calibration windows)")]
    try:
        for model, options, other_text, reason in refusals:
            if other_text:
                shutil.copyfile(text_dir / other_text, calib)           # the same file name, another text
            run = bitsmith(quantize(model, out, calib, *GPTQ, *options, "--resume"))
            assert (run.code, run.stderr.splitlines()) == (2, [refused(out, reason)])
            assert files(partial(out)) == before
    finally:
        calib.write_bytes(text)
    assert finished(bitsmith, quantize(stories_path, out, calib, *GPTQ, "--resume")) == [resuming(out, 1)]
    assert files(out) == reference


@pytest.mark.slow
def test_target_bpw_run_measures_again_only_when_killed_before_saving_its_measurement(
        tmp_path, bitsmith, stories_path, calib):
    out = tmp_path / "out"
    args = quantize(stories_path, out, calib, *TARGET, "--resume")
    killed(bitsmith, args, at="measured")                                   # measured, not yet saved
    assert killed(bitsmith, args, at="block:2") == [resuming(out, 0)]        # measured again, saved
    saved = shutil.copyfile(partial(out) / "measurement.json", tmp_path / "measurement.json")
    run = bitsmith(args, kill="measure")                                     # killed if it measured again
    assert (run.code, run.notes) == (0, [resuming(out, 3)])
    whole = tmp_path / "whole"
    finished(bitsmith, quantize(stories_path, whole, calib, *TARGET, "--measurement", saved))
    assert files(out) == files(whole)                      # measurement.json included: saved as published


def plan(bits: int) -> QuantPlan:
    opts = QuantizeOptions()
    opts.validate()
    return QuantPlan(opts, {"model.layers.0.mlp.up_proj": LayerPlan(bits, 128, False)})


class Journaled:
    """A writer whose journal holds `entries`; what `record` adds."""

    def __init__(self, entries):
        self.resumed, self.recorded = entries, []

    def record(self, entry):
        self.recorded.append(entry)


def test_plan_is_recorded_once_and_another_plan_is_refused():
    fresh = Journaled([])
    check_plan(fresh, plan(4), "out")
    check_plan(Journaled(fresh.recorded), plan(4), "out")
    with pytest.raises(ResumeRefused, match="^out: cannot resume: the plan differs from the interrupted run's"):
        check_plan(Journaled(fresh.recorded), plan(3), "out")
