"""`bitsmith regress`: record golden values, run against them (exit 0), catch a value outside its band (exit 1),
refuse bad suites (exit 2, one line per problem), reuse cached quantized models, and say when a run's inputs are not
the golden values' (fingerprints)."""
from __future__ import annotations

import json
import shutil
import textwrap
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from bitsmith import api, harness
from bitsmith.cli.main import main

SUITE = """\
[defaults]
model = "{model}"
eval = {{ data = "eval.txt", seqlen = 128, max_tokens = 2048 }}
threads = 1

[defaults.metrics]
perplexity = {{ rel = 0.01 }}
kl = {{ abs = 0.002 }}
top1 = {{ abs = 0.01 }}
bpw = {{ abs = 0, side = "both" }}
output_bytes = {{ abs = 0, side = "both" }}
quantize_seconds = {{}}

[[case]]
name = "rtn-w4"
quantize = {{ method = "rtn", bits = 4, group-size = 32 }}

[[case]]
name = "gptq-w3"
quantize = {{ method = "gptq", bits = 3, group-size = 32, calib = "calib.txt", nsamples = 4, seqlen = 64 }}
"""


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, stories_path, stories_split):
    """A suite of two cases beside its texts (paths relative to it), recorded once."""
    folder = tmp_path_factory.mktemp("suite")
    shutil.copy(stories_split[0], folder / "calib.txt")
    shutil.copy(stories_split[1], folder / "eval.txt")
    (folder / "s.toml").write_text(SUITE.format(model=stories_path))
    r = run("regress", folder / "s.toml", "--record")
    assert r.exit_code == 0, r.output
    return folder


@pytest.fixture
def suite(recorded, tmp_path):
    """A copy of the recorded suite, golden file and cache included, for a test to change."""
    folder = tmp_path / "suite"
    shutil.copytree(recorded, folder)
    return folder


def golden(folder):
    return json.loads((folder / "s.golden.json").read_text())


def set_golden(folder, change):
    body = golden(folder)
    change(body["cases"])
    (folder / "s.golden.json").write_text(json.dumps(body))


def test_record_writes_measured_values_with_provenance(recorded, stories_path):
    cases = golden(recorded)["cases"]
    assert list(cases) == ["rtn-w4", "gptq-w3"]
    for entry in cases.values():
        assert set(entry["metrics"]) == {"perplexity", "kl", "top1", "bpw", "output_bytes", "quantize_seconds"}
        assert entry["metrics"]["perplexity"] > 1 and 0 < entry["metrics"]["top1"] <= 1
        assert set(entry["recorded"]["versions"]) >= {"bitsmith", "torch", "transformers"}
        assert entry["recorded"]["date"] and entry["recorded"]["machine"]["arch"]
        assert set(entry["fingerprints"]) >= {"source", "calibration", "weights", "eval_data", "options"}
    assert cases["gptq-w3"]["metrics"]["kl"] > cases["rtn-w4"]["metrics"]["kl"] > 0
    assert cases["rtn-w4"]["fingerprints"]["calibration"] == ""          # RTN calibrates on nothing
    assert len(cases["gptq-w3"]["fingerprints"]["calibration"]) == 64
    assert (recorded / ".bitsmith-regress-cache" / ".gitignore").read_text().endswith("*\n")


def test_unchanged_run_passes_from_the_cache_and_writes_every_report(suite, monkeypatch):
    def no_quantizing(*args, **kwargs):
        raise AssertionError("a cached case quantized again")

    monkeypatch.setattr(api, "quantize", no_quantizing)
    r = run("regress", suite / "s.toml", "--junit", suite / "r.xml", "--markdown", suite / "r.md",
            "--json", suite / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((suite / "r.json").read_text())
    assert report["exit_code"] == 0 and [c["cache"] for c in report["cases"]] == ["hit", "hit"]
    assert report["counts"] == {"ok": 10, "info": 2}
    assert "cached quantized model" in r.stderr and "every judged metric inside its band" in r.stdout
    xml = ET.parse(suite / "r.xml").getroot()
    testcases = xml.findall(".//testcase")
    assert len(testcases) == 12 and xml.get("failures") == "0"
    assert {(t.get("classname"), t.get("name")) for t in testcases} >= {("s.rtn-w4", "perplexity"),
                                                                       ("s.gptq-w3", "kl")}
    md = (suite / "r.md").read_text()
    assert "| status | case | metric | golden | measured | change | band |" in md and md.count("| ok |") == 10


def test_a_value_outside_its_band_fails_worst_first(suite):
    def perturb(cases):
        cases["gptq-w3"]["metrics"]["perplexity"] /= 1.05     # measured is now 5 % worse than golden: band 1 %
        cases["rtn-w4"]["metrics"]["top1"] += 0.005           # within the band of 0.01
        cases["rtn-w4"]["metrics"]["kl"] += 0.01              # measured is better beyond the band: stale golden

    set_golden(suite, perturb)
    r = run("regress", suite / "s.toml", "--junit", suite / "r.xml", "--json", suite / "r.json")
    assert r.exit_code == 1, r.output
    table = r.stdout.splitlines()
    assert table[0].split() == ["status", "case", "metric", "golden", "measured", "change", "band"]
    assert table[1].split()[:3] == ["REGRESSED", "gptq-w3", "perplexity"]
    assert table[2].split()[:3] == ["improved", "rtn-w4", "kl"]
    assert "FAILED: 1 regressed, 1 improved, 8 ok, 2 info" in r.stdout
    failures = ET.parse(suite / "r.xml").getroot().findall(".//failure")
    assert len(failures) == 1
    message = failures[0].get("message")
    assert "gptq-w3 perplexity regressed" in message and "band +1%" in message and "(+5.00%)" in message
    assert "golden:" in failures[0].text and "measured:" in failures[0].text
    rows = {(c["name"], m["metric"]): m for c in json.loads((suite / "r.json").read_text())["cases"]
            for m in c["metrics"]}
    assert rows["rtn-w4", "top1"]["status"] == "ok" and 0.4 < rows["rtn-w4", "top1"]["severity"] < 0.6


def test_a_two_sided_band_fails_a_move_either_way(suite):
    set_golden(suite, lambda cases: cases["rtn-w4"]["metrics"].update(bpw=cases["rtn-w4"]["metrics"]["bpw"] + 0.01))
    r = run("regress", suite / "s.toml", "--only", "rtn-w4")
    assert r.exit_code == 1 and r.stdout.splitlines()[1].split()[:3] == ["CHANGED", "rtn-w4", "bpw"]


def test_other_fingerprints_are_reported(suite):
    def other_inputs(cases):
        cases["gptq-w3"]["fingerprints"]["calibration"] = "0" * 64
        cases["gptq-w3"]["recorded"]["versions"]["torch"] = "1.0"

    set_golden(suite, other_inputs)
    r = run("regress", suite / "s.toml", "--markdown", suite / "r.md")
    assert r.exit_code == 0, r.output
    assert "note: gptq-w3: measured on other calibration than the golden values (fingerprint 000000000000" in r.stdout
    assert "note: gptq-w3: golden values recorded with torch 1.0" in r.stdout
    assert "measured on other calibration" in (suite / "r.md").read_text()


def test_changed_options_miss_the_cache_and_are_reported(suite):
    toml = (suite / "s.toml").read_text().replace("method = \"rtn\", bits = 4", "method = \"rtn\", bits = 8")
    (suite / "s.toml").write_text(toml)
    r = run("regress", suite / "s.toml", "--only", "rtn-w4", "--json", "-")
    report = json.loads(r.stdout)
    assert report["cases"][0]["cache"] == "miss" and r.exit_code == 1      # 8 bits: more bytes, a size change
    assert any("measured on other options" in n for n in report["cases"][0]["notes"])
    assert any("measured on other weights" in n for n in report["cases"][0]["notes"])


def test_a_case_without_golden_values_is_refused_before_any_work(suite):
    (suite / "s.toml").write_text((suite / "s.toml").read_text() + '\n[[case]]\nname = "new"\n'
                                  'quantize = { method = "rtn" }\n')
    r = run("regress", suite / "s.toml")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == (f"error: case new: no golden values yet in {suite / 's.golden.json'}; record with: "
                        f"bitsmith regress {suite / 's.toml'} --record --only new\n")
    r = run("regress", suite / "s.toml", "--record", "--only", "new", "--cache", suite / "other-cache")
    assert r.exit_code == 0, r.output
    assert list(golden(suite)["cases"]) == ["rtn-w4", "gptq-w3", "new"]          # the others kept as they were
    assert run("regress", suite / "s.toml", "--only", "new,rtn-w4", "--cache", suite / "other-cache").exit_code == 0


def test_an_error_met_while_running_is_bad_input(suite, stories_path):
    (suite / "s.toml").write_text(textwrap.dedent(f"""\
        [[case]]
        name = "too-long"
        model = "{stories_path}"
        eval = {{ data = "eval.txt", seqlen = 1024 }}
        metrics.perplexity = {{ rel = 0.01 }}
        """))
    r = run("regress", suite / "s.toml", "--record", "--junit", suite / "r.xml")
    assert r.exit_code == 2
    assert "error: too-long: --seqlen 1024 exceeds the model's context of 512 tokens" in r.stderr
    errors = ET.parse(suite / "r.xml").getroot().findall(".//error")
    assert len(errors) == 1 and "exceeds the model's context" in errors[0].get("message")


def test_a_quantized_folder_is_measured_as_it_is(suite, stories_path):
    folder = next((suite / ".bitsmith-regress-cache").glob("*/model"))
    (suite / "s.toml").write_text(textwrap.dedent(f"""\
        [[case]]
        name = "given"
        model = "{folder}"
        base = "{stories_path}"
        eval = {{ data = "eval.txt", seqlen = 128, max_tokens = 1024 }}
        metrics = {{ kl = {{ abs = 0.001 }}, bpw = {{ abs = 0.0 }} }}
        """))
    r = run("regress", suite / "s.toml", "--record", "--json", "-")
    assert r.exit_code == 0, r.output
    case = json.loads(r.stdout)["cases"][0]
    assert case["cache"] is None and {m["metric"] for m in case["metrics"]} == {"kl", "bpw"}
    assert "base" in case["fingerprints"]


def test_lm_eval_tasks_are_skipped_without_lm_eval(suite, stories_path, monkeypatch):
    monkeypatch.setattr(harness, "missing", lambda: "lm-eval is not installed (pip install 'bitsmith[lm-eval]')")
    (suite / "s.toml").write_text(textwrap.dedent(f"""\
        [[case]]
        name = "tasks"
        model = "{stories_path}"
        eval = {{ data = "eval.txt", seqlen = 128, max_tokens = 1024 }}
        metrics.perplexity = {{ rel = 0.01 }}
        metrics.lm_eval = {{ tasks = ["hellaswag", "arc_easy"], limit = 100, abs = 0.02 }}
        """))
    assert run("regress", suite / "s.toml", "--record").exit_code == 0
    r = run("regress", suite / "s.toml", "--junit", suite / "r.xml")
    assert r.exit_code == 0, r.output
    assert [line.split()[:3] for line in r.stdout.splitlines()[1:3]] == [["ok", "tasks", "perplexity"],
                                                                          ["skipped", "tasks", "lm_eval:hellaswag"]]
    skipped = ET.parse(suite / "r.xml").getroot().findall(".//skipped")
    assert len(skipped) == 2 and "lm-eval is not installed" in skipped[0].get("message")


def case(*lines, name="a"):
    """A suite of one case named `name` on the model, with these lines."""
    return "\n".join(["[[case]]", f'name = "{name}"', 'model = "{model}"', *lines, ""])


QUANTIZED = ["quantize = {{}}", "metrics.bpw = {{ abs = 0 }}"]
PERPLEXITY = ['eval = {{ data = "eval.txt" }}']
BAD = [
    (case("metrics.perplexity = {{ rel = 0.01 }}", 'eval = {{ data = "x.txt" }}'),
     "case a.eval.data: x.txt: no such file"),
    (case("metrics.perplexity = {{ rel = 0.01 }}", *PERPLEXITY).replace("{model}", "nowhere"),
     "case a.model: nowhere: no such file or folder"),
    (case("metrics.perplexity = {{ rel = -0.01 }}", *PERPLEXITY),
     "case a.metrics.perplexity.rel: expected a number >= 0, got -0.01 (a number)"),
    (case('metrics.perplexity = {{ side = "both" }}', *PERPLEXITY), "case a.metrics.perplexity: no band: give abs"),
    (case('metrics.perplexity = {{ rel = 0.1, side = "up" }}', *PERPLEXITY),
     'case a.metrics.perplexity.side: expected "worse" or "both", got "up"'),
    (case("metrics.perplexty = {{ rel = 0.01 }}"), "case a.metrics: unknown key 'perplexty' (did you mean perplexity?)"),
    (case("quantize = {{}}", "metrics.quantize_seconds = {{ rel = 1 }}"),
     "case a.metrics.quantize_seconds: informative only (never judged): give it no band"),
    (case('quantize = {{ bits = "4" }}', "metrics.bpw = {{ abs = 0 }}"),
     'case a.quantize.bits: expected an integer, got "4" (a string)'),
    (case("quantize = {{ bits = 7 }}", "metrics.bpw = {{ abs = 0 }}"), "case a.quantize: --bits 7: choose one of 2, 3, 4, 5, 6, 8"),
    (case('quantize = {{ method = "awq" }}', "metrics.bpw = {{ abs = 0 }}"),
     "case a.quantize.method: expected one of 'rtn', 'gptq', 'qoq', got \"awq\" (a string)"),
    (case("quantize = {{ group_sise = 32 }}", "metrics.bpw = {{ abs = 0 }}"),
     "case a.quantize: unknown key 'group_sise' (did you mean group-size?)"),
    (case('quantize = {{ target-bpw = 3.25, plan = "eval.txt" }}', "metrics.bpw = {{ abs = 0 }}"),
     "case a.quantize: --plan applies a plan as written"),
    (case('quantize = {{ sym = "yes" }}', "metrics.bpw = {{ abs = 0 }}"),
     'case a.quantize.sym: expected true or false, got "yes" (a string)'),
    (case("metrics.kl = {{ abs = 0.01 }}", *PERPLEXITY), "case a.metrics.kl: needs base = MODEL"),
    (case("metrics.bpw = {{ abs = 0 }}"), "case a.metrics.bpw: needs a quantized model"),
    (case("quantize = {{}}", "metrics.perplexity = {{ rel = 0.01 }}"),
     "case a.metrics.perplexity: needs an eval table"),
    (case("metrics.perplexity = {{ rel = 0.01 }}", 'eval = {{ data = "eval.txt", seqlen = 1 }}'),
     "case a.eval.seqlen: seqlen 1: a window needs at least 2 tokens"),
    (case(*QUANTIZED, name="a b"), "case a b.name: 'a b': use letters, digits"),
    (case(*QUANTIZED) + case(*QUANTIZED), "case a: a second case with this name"),
    (case("quantize = {{}}"), "case a: missing metrics"),
    (case(*QUANTIZED, "seed = 1"), "case a: unknown key 'seed'"),
    ('[defaults]\nmodel = 3\n' + case(), "defaults.model: expected a non-empty string, got 3 (an integer)"),
    ('[case]\nname = "a"\n', "case: expected [[case]] tables"),
    ('title = "x"\n' + case(*QUANTIZED), "suite: unknown key 'title'"),
    ("[[case]\n", "not a readable TOML file"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[m for _, m in BAD])
def test_a_malformed_suite_is_one_line_and_exit_2(tmp_path, stories_path, body, message):
    (tmp_path / "eval.txt").write_text("Once upon a time there was a cat.\n")
    (tmp_path / "s.toml").write_text(body.format(model=stories_path))
    r = run("regress", tmp_path / "s.toml")
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 's.toml'}: "), r.stderr
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.txt", "s.toml"]      # nothing written


def test_every_problem_of_a_suite_gets_its_line(tmp_path, stories_path):
    (tmp_path / "s.toml").write_text(textwrap.dedent(f"""\
        [[case]]
        name = "a"
        model = "{stories_path}"
        quantize = {{ bits = "4", damp = "x" }}
        metrics.bpw = {{ abs = -1 }}
        """))
    r = run("regress", tmp_path / "s.toml")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "error: --only nope: no such case in"),
    (["--junit", "no/such/folder/r.xml"], "error: --junit no/such/folder/r.xml: the folder no/such/folder does not"),
    (["--jobs", "0"], "error: Invalid value for '--jobs'"),
])
def test_bad_options_are_exit_2(suite, args, message):
    r = run("regress", suite / "s.toml", *args)
    assert r.exit_code == 2 and r.stderr.startswith(message), r.stderr


def test_a_malformed_golden_file_is_exit_2(suite):
    set_golden(suite, lambda cases: cases["rtn-w4"]["metrics"].update(kl="small"))
    r = run("regress", suite / "s.toml")
    assert r.exit_code == 2 and 'cases.rtn-w4.metrics.kl: expected a number, got "small"' in r.stderr
    (suite / "s.golden.json").write_text("{")
    r = run("regress", suite / "s.toml")
    assert r.exit_code == 2 and "not a readable golden file" in r.stderr


def test_suite_file_not_found(tmp_path):
    r = run("regress", tmp_path / "none.toml")
    assert r.exit_code == 2 and r.stderr == f"error: {tmp_path / 'none.toml'}: suite file not found\n"


@pytest.mark.slow
def test_jobs_run_cases_in_processes_of_their_own(suite, monkeypatch):
    shutil.rmtree(suite / ".bitsmith-regress-cache")
    r = run("regress", suite / "s.toml", "--jobs", "2", "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [c["cache"] for c in report["cases"]] == ["miss", "miss"]
    assert all(m["status"] in ("ok", "info") for c in report["cases"] for m in c["metrics"])
    assert all(c["notes"] == [] for c in report["cases"])       # the same weights: one thread, as recorded


def test_another_thread_count_than_the_goldens_is_noted(suite):
    """GPTQ's roundings follow float sums, which follow the thread count: a run with another than the recorded
    one says so (the case's own threads setting is in its options fingerprint, so that one is noted too)."""
    def recorded_with(cases):
        cases["gptq-w3"]["recorded"]["threads"] = 3
    set_golden(suite, recorded_with)
    r = run("regress", suite / "s.toml", "--json", "-")
    assert r.exit_code == 0, r.output
    notes = {c["name"]: c["notes"] for c in json.loads(r.stdout)["cases"]}
    note = ("gptq-w3: golden values recorded with 3 torch threads, this ran with 1: float sums, and so roundings, "
            "can differ (set threads in the suite)")
    assert notes == {"rtn-w4": [], "gptq-w3": [note]}


