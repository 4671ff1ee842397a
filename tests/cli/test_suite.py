"""The suite file of `bitsmith regress` and the judging of a value against its band, without running any model:
whatever a suite holds, reading it gives cases or one line per problem (never a traceback), and a value is judged
by its band exactly."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests_support import REPO

from bitsmith.cli.suite import SuiteError, golden_path, read_suite
from bitsmith.regress import METRICS, Band, judge


def toml_value(value) -> str:
    """A TOML literal of a JSON-like value (strings, finite numbers, booleans, arrays, inline tables)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_suite(folder, cases: list[dict]) -> str:
    text = "".join("[[case]]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in c.items())
                   for c in cases)
    (folder / "s.toml").write_text(text)
    return str(folder / "s.toml")


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "eval.txt").write_text("text\n")
    return str(folder)


def test_a_good_suite_reads_into_cases(tmp_path, model):
    path = write_suite(tmp_path, [
        {"name": "w4", "model": model, "eval": {"data": "eval.txt", "seqlen": 64},
         "quantize": {"bits": 4, "group-size": 32, "method": "rtn", "sym": True},
         "metrics": {"perplexity": {"rel": 0.01}, "top1": {"abs": 0.02, "side": "both"}, "peak_rss_bytes": {}}}])
    (case,) = read_suite(path).cases
    assert case.quantize == {"bits": 4, "group_size": 32, "method": "rtn", "sym": True}
    assert case.options["quantize"]["bits"] == 4 and case.options["quantize"]["calib"] == ["self"]
    assert case.base == model and case.eval.data == str(tmp_path / "eval.txt") and case.eval.seqlen == 64
    assert case.metrics == {"perplexity": Band(rel=0.01), "top1": Band(abs=0.02, both=True), "peak_rss_bytes": None}
    assert golden_path(path) == str(tmp_path / "s.golden.json")


def test_defaults_merge_key_by_key(tmp_path, model):
    (tmp_path / "s.toml").write_text(
        f'[defaults]\nmodel = "{model}"\nquantize = {{ method = "rtn", bits = 4 }}\n'
        'metrics = { bpw = { abs = 0 }, output_bytes = { abs = 0 } }\n'
        '[[case]]\nname = "a"\nquantize.bits = 3\nmetrics.bpw = { abs = 0.5 }\n'
        '[[case]]\nname = "b"\n')
    a, b = read_suite(str(tmp_path / "s.toml")).cases
    assert a.quantize == {"method": "rtn", "bits": 3} and b.quantize == {"method": "rtn", "bits": 4}
    assert a.metrics == {"bpw": Band(abs=0.5), "output_bytes": Band()} and b.metrics["bpw"] == Band()


values = st.recursive(st.one_of(st.text(max_size=8), st.integers(-5, 300), st.booleans(),
                                st.floats(-2, 2, allow_nan=False)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.sampled_from(["abs", "rel", "side", "bits", "x"]),
                                                              inner, max_size=3)),
                      max_leaves=6)
keys = st.sampled_from(["name", "model", "base", "quantize", "eval", "metrics", "nme"])
metric_tables = st.dictionaries(st.sampled_from([*METRICS, "lm_eval", "ppl"]), values, max_size=3)


@settings(max_examples=60, deadline=None)
@given(cases=st.lists(st.dictionaries(keys, values, max_size=5), min_size=1, max_size=2),
       metrics=metric_tables)
def test_any_suite_reads_or_says_what_is_wrong(tmp_path_factory, cases, metrics):
    folder = tmp_path_factory.mktemp("s")
    (folder / "m").mkdir()
    for c in cases:
        c.setdefault("model", str(folder / "m"))
        c["metrics"] = metrics
    path = write_suite(folder, cases)
    try:
        suite = read_suite(path)
    except SuiteError as e:
        assert e.lines and all(line.startswith(f"{path}: ") and "\n" not in line for line in e.lines)
    else:
        assert len(suite.cases) == len(cases)


bands = st.builds(Band, st.floats(0, 10), st.floats(0, 1), st.booleans())


@settings(max_examples=300, deadline=None)
@given(metric=st.sampled_from(["perplexity", "kl", "top1", "bpw"]), band=bands,
       golden=st.floats(-1e6, 1e6), move=st.floats(-1e3, 1e3))
def test_a_value_is_judged_by_its_band(metric, band, golden, move):
    measured = golden + move
    row = judge(metric, band, golden, measured)
    worse = (measured - golden) * (1 if METRICS[metric].worse == "higher" else -1)
    allowed = band.abs + band.rel * abs(golden)
    margin = 1e-9 * max(1.0, abs(golden), allowed)
    if worse > allowed + margin:
        assert row["status"] == "regressed" and row["severity"] > 1
    elif -worse > allowed + margin:
        assert row["status"] == ("changed" if band.both else "improved")
    elif abs(abs(worse) - allowed) > margin:
        assert row["status"] == "ok" and row["severity"] <= 1
    assert judge(metric, band, golden, golden)["status"] == "ok"


def test_direction_and_informative_metrics():
    assert judge("perplexity", Band(rel=0.01), 10.0, 10.2)["status"] == "regressed"
    assert judge("perplexity", Band(rel=0.01), 10.0, 9.8)["status"] == "improved"
    assert judge("top1", Band(abs=0.01), 0.8, 0.78)["status"] == "regressed"
    assert judge("top1", Band(abs=0.01), 0.8, 0.82)["status"] == "improved"
    assert judge("bpw", Band(both=True), 4.0, 3.99)["status"] == "changed"
    assert judge("perplexity", Band(abs=1), 10.0, math.nan)["status"] == "regressed"
    assert judge("quantize_seconds", None, 10.0, 99.0)["status"] == "info"
    assert Band(rel=0.02).describe("higher") == "+2%" and Band(abs=0.01).describe("lower") == "-0.01"
    assert Band(abs=0.5, rel=0.01, both=True).describe("higher") == "±(0.5 + 1%)"


@pytest.mark.parametrize("name", ["stories260k", "smollm2"])
def test_the_repositorys_suites_read_and_have_every_golden_value(name, text_dir):
    """`.ci/run` and `make regress` run these: a suite that no longer reads, or a case or metric without a recorded
    golden value, would stop them with exit 2 before any work."""
    from bitsmith.cli.suite import read_golden, unrecorded
    suite = read_suite(str(REPO / "regress" / f"{name}.toml"))
    golden = read_golden(suite.golden_path)
    assert unrecorded(suite, suite.cases, golden, set()) == []
    assert {c.name for c in suite.cases} == set(golden)
