"""The suite file of `bitsmith regress` (TOML, written by hand) and its golden file (`<suite>.golden.json` beside
it, written by `--record`), read and checked before any work: each malformed field is one line naming it.

    [defaults]                          # optional: what every case starts from (tables merge key by key)
    model = "../models/stories260K"     # paths are relative to the suite file
    eval = { data = "eval.txt", seqlen = 256, max_tokens = 4096 }

    [[case]]
    name = "w4g32"
    quantize = { method = "gptq", bits = 4, group-size = 32, calib = "calib.txt" }   # `quantize`'s long options
    metrics.perplexity = { rel = 0.01 }          # band: abs + rel x |golden|, the worse way only; side = "both"
    metrics.kl = { abs = 0.002 }                 #   fails a move either way
    metrics.quantize_seconds = {}                # informative: reported, never judged
    threads = 1                                  # torch threads per case (default: torch's own, split among
                                                 #   --jobs); float sums, and so GPTQ's roundings, follow it
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ..formats.errors import InputError
from ..regress import GOLDEN_VERSION, LM_EVAL, METRICS, Band, Case, EvalSpec, LMEvalSpec, kind

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
NOT_IN_SUITES = {"out", "overwrite", "resume", "json_path", "eval_data", "eval_seqlen", "eval_max_tokens", "device"}

# kind -> (test, what it expects)
KINDS = {
    "string": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "count": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "count0": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "margin": (lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0, "a number >= 0"),
    "side": (lambda v: v in ("worse", "both"), '"worse" or "both"'),
    "strings": (lambda v: isinstance(v, list) and v and all(isinstance(s, str) and s for s in v),
                "an array of strings"),
    "table": (lambda v: isinstance(v, dict), "a table"),
}
CASE = {"name": "string", "model": "string", "base": "string", "quantize": "table", "eval": "table",
        "metrics": "table", "threads": "count"}
DEFAULTS = {k: v for k, v in CASE.items() if k != "name"}
EVAL = {"data": "string", "seqlen": "count", "max_tokens": "count"}
BAND = {"abs": "margin", "rel": "margin", "side": "side"}
LM_EVAL_TABLE = {"tasks": "strings", "limit": "count", "num_fewshot": "count0", "metric": "string",
                 "batch_size": "count", "include_path": "strings", **BAND}


class SuiteError(InputError):
    """Bad input in a suite or golden file: one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Suite:
    path: str
    cases: list[Case]

    @property
    def golden_path(self) -> str:
        return golden_path(self.path)

    def select(self, only: tuple[str, ...]) -> list[Case]:
        """The cases named (each `--only` may list several, comma-separated), in the suite's order."""
        names = [n for given in only for n in given.split(",") if n]
        known = [c.name for c in self.cases]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SuiteError([f"--only {n}: no such case in {self.path} (cases: {', '.join(known)})" for n in unknown])
        return [c for c in self.cases if not names or c.name in names]


def golden_path(suite: str) -> str:
    return str(Path(suite).with_suffix("")) + ".golden.json"


class Problems:
    def __init__(self, where: str):
        self.where, self.lines = where, []

    def add(self, at: str, what: str) -> None:
        self.lines.append(f"{self.where}: {at}: {what}")


def read_suite(path: str) -> Suite:
    """The suite's cases, every field checked; SuiteError lists every problem found."""
    from ..formats.paths import read_bytes
    if not os.path.lexists(path):
        raise SuiteError([f"{path}: suite file not found"])
    raw = read_bytes(path, f"{path}: suite file")
    problems = Problems(path)
    try:
        body = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SuiteError([f"{path}: not a readable TOML file ({' '.join(str(e).split())})"]) from None
    top = check_table(body, {"defaults": "table", "case": "cases"}, "suite", problems)
    defaults = check_table(top.get("defaults", {}), DEFAULTS, "defaults", problems)
    if problems.lines:                      # every case would repeat them
        raise SuiteError(problems.lines)
    tables = body.get("case")
    if tables is None:
        problems.add("suite", "no [[case]] tables")
    elif not (isinstance(tables, list) and all(isinstance(t, dict) for t in tables)):
        problems.add("case", "expected [[case]] tables (an array of tables)")
        tables = []
    cases, names = [], set()
    base_dir = os.path.dirname(path) or "."
    for i, table in enumerate(tables or [], 1):
        label = f"case {table['name']}" if isinstance(table.get("name"), str) else f"case #{i}"
        case = _case(_merged(defaults, table), label, base_dir, problems)
        if case is None:
            continue
        if case.name in names:
            problems.add(label, "a second case with this name (names are unique)")
        names.add(case.name)
        cases.append(case)
    if problems.lines:
        raise SuiteError(problems.lines)
    return Suite(path, cases)


def check_table(table: dict, schema: dict[str, str], at: str, problems: Problems, required=()) -> dict:
    """The entries of `table` its schema allows and whose values are of the kind it names; every unknown key,
    value of the wrong kind and missing required key is a problem."""
    good = {}
    for key, value in table.items():
        if key not in schema:
            problems.add(at, unknown(key, schema))
        elif schema[key] in KINDS and not KINDS[schema[key]][0](value):
            problems.add(f"{at}.{key}", f"expected {KINDS[schema[key]][1]}, got {shown(value)}")
        else:
            good[key] = value
    for key in required:
        if key not in table:
            problems.add(at, f"missing {key}")
    return good


def unknown(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})")


def shown(value) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "a table"}
    return f"{json.dumps(value, default=str)[:40]} ({kinds.get(type(value), type(value).__name__)})"


def _merged(defaults: dict, table: dict) -> dict:
    merged = dict(defaults)
    for key, value in table.items():
        old = merged.get(key)
        merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _case(table: dict, label: str, base_dir: str, problems: Problems) -> Case | None:
    before = len(problems.lines)
    t = check_table(table, CASE, label, problems, required=("name", "model", "metrics"))
    if "name" in t and not NAME.match(t["name"]):
        problems.add(f"{label}.name", f"{t['name']!r}: use letters, digits, '.', '_' and '-' (a file-name-like name)")
    model = _model(t.get("model"), f"{label}.model", base_dir, problems)
    base = _model(t.get("base"), f"{label}.base", base_dir, problems)
    quantize = options = None
    if "quantize" in t:
        quantize, options = quantize_options(t["quantize"], f"{label}.quantize", base_dir, problems)
    evaluation = _eval(t.get("eval"), f"{label}.eval", base_dir, problems)
    lm_eval = None
    if isinstance(t.get("metrics", {}).get(LM_EVAL), dict):
        lm_eval = _lm_eval(t["metrics"][LM_EVAL], f"{label}.metrics.{LM_EVAL}", base_dir, problems)
    metrics = _metrics(t["metrics"], f"{label}.metrics", lm_eval, problems) if "metrics" in t else {}
    if len(problems.lines) > before:
        return None
    measured_as_is = "quantize" not in t
    if not measured_as_is and _is_bitsmith_folder(model):
        problems.add(f"{label}.model", f"{t['model']} is already quantized: measure it without a quantize table, "
                                       "or quantize its source")
    base = base or (model if not measured_as_is else None)
    for metric in metrics:
        needs = kind(metric).needs
        if needs in ("eval", "base") and evaluation is None:
            problems.add(f"{label}.metrics.{metric}", "needs an eval table (data = TEXT FILE)")
        if needs == "base" and base is None:
            problems.add(f"{label}.metrics.{metric}", "needs base = MODEL, the unquantized model to compare with")
        if needs == "quantize" and measured_as_is:
            problems.add(f"{label}.metrics.{metric}", "measures a quantize run: the case has no quantize table")
        if needs == "checkpoint" and measured_as_is and not _is_bitsmith_folder(model):
            problems.add(f"{label}.metrics.{metric}", f"needs a quantized model: {t['model']} is not a bitsmith "
                                                      "folder and the case has no quantize table")
    if len(problems.lines) > before:
        return None
    settings = {"quantize": options, "eval": evaluation and {"seqlen": evaluation.seqlen,
                                                            "max_tokens": evaluation.max_tokens},
                "lm_eval": lm_eval and {**vars(lm_eval), "tasks": list(lm_eval.tasks),
                                        "include_path": t["metrics"][LM_EVAL].get("include_path", [])},
                "base": base if base != model else None, **({"threads": t["threads"]} if "threads" in t else {})}
    return Case(t["name"], model, base, quantize, settings, evaluation, lm_eval, metrics, t.get("threads"))


def _resolve(base_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _model(spec: str | None, at: str, base_dir: str, problems: Problems) -> str | None:
    from ..formats.source import BUNDLED, bundled_path
    if spec is None:
        return None
    if spec in BUNDLED:
        try:
            bundled_path(spec)
        except InputError as e:
            problems.add(at, str(e))
        return spec
    path = _resolve(base_dir, spec)
    if not os.path.exists(path):
        problems.add(at, f"{spec}: no such file or folder ({path}; paths are relative to the suite file), and not a "
                         f"bundled model name ({', '.join(BUNDLED)})")
    return path


def _is_bitsmith_folder(model: str | None) -> bool:
    from ..formats.checkpoint import MANIFEST
    return model is not None and (Path(model) / MANIFEST).is_file()


def _file(spec: str, at: str, base_dir: str, problems: Problems) -> str:
    path = _resolve(base_dir, spec)
    if not os.path.isfile(path):
        problems.add(at, f"{spec}: no such file ({path}; paths are relative to the suite file)")
    return path


def _eval(table: dict | None, at: str, base_dir: str, problems: Problems) -> EvalSpec | None:
    from ..calibration.data import eval_seqlen
    if table is None:
        return None
    t = check_table(table, EVAL, at, problems, required=("data",))
    if "data" not in t:
        return None
    if "seqlen" in t:
        try:
            eval_seqlen(t["seqlen"], None, "seqlen")
        except InputError as e:
            problems.add(f"{at}.seqlen", str(e))
    return EvalSpec(_file(t["data"], f"{at}.data", base_dir, problems), t.get("seqlen"), t.get("max_tokens"))


def _band(table: dict, at: str, problems: Problems, schema=BAND) -> Band | None:
    t = check_table(table, schema, at, problems)
    if "abs" not in table and "rel" not in table:
        problems.add(at, "no band: give abs (a margin in the metric's unit), rel (a fraction of the golden value) "
                         "or both")
        return None
    return Band(float(t.get("abs", 0.0)), float(t.get("rel", 0.0)), t.get("side") == "both")


def _metrics(table: dict, at: str, lm_eval: LMEvalSpec | None, problems: Problems) -> dict:
    metrics = {}
    if not table:
        problems.add(at, f"no metrics (choose from {', '.join([*METRICS, LM_EVAL])})")
    for name, entry in table.items():
        if name not in METRICS and name != LM_EVAL:
            problems.add(at, unknown(name, [*METRICS, LM_EVAL]))
        elif not isinstance(entry, dict):
            problems.add(f"{at}.{name}", f"expected a table (a band, or {{}} for an informative metric), got "
                                         f"{shown(entry)}")
        elif name == LM_EVAL:
            band = _band({k: v for k, v in entry.items() if k in BAND}, f"{at}.{name}", problems)
            if lm_eval is not None:
                metrics.update({f"{LM_EVAL}:{task}": band for task in lm_eval.tasks})
        elif METRICS[name].worse is None:
            if entry:
                problems.add(f"{at}.{name}", "informative only (never judged): give it no band, {}")
            metrics[name] = None
        else:
            metrics[name] = _band(entry, f"{at}.{name}", problems)
    return metrics


def _lm_eval(table: dict, at: str, base_dir: str, problems: Problems) -> LMEvalSpec | None:
    t = check_table(table, LM_EVAL_TABLE, at, problems, required=("tasks",))
    if "tasks" not in t:
        return None
    folders = tuple(_resolve(base_dir, p) for p in t.get("include_path", []))
    for given, folder in zip(t.get("include_path", []), folders):
        if not os.path.isdir(folder):
            problems.add(f"{at}.include_path", f"{given}: no such folder (task YAMLs; relative to the suite)")
    return LMEvalSpec(tuple(t["tasks"]), t.get("limit"), t.get("num_fewshot"), t.get("batch_size", 1), folders,
                      t.get("metric", "acc"))


def suite_options() -> dict[str, click.Option]:
    """The options of `bitsmith quantize` a suite's quantize table may set, by their long name without the dashes
    (`group-size`, `target-bpw`, `plan`; `sym = false` for `--asym`)."""
    from .main import quantize
    return {max(p.opts, key=len).lstrip("-"): p for p in quantize.params
            if isinstance(p, click.Option) and p.name not in NOT_IN_SUITES}


def quantize_options(table: dict, at: str, base_dir: str, problems: Problems) -> tuple[dict, dict]:
    """(keyword arguments of `api.quantize`, the complete options with files by their sha256): the table checked
    against `bitsmith quantize`'s own options, their types and the checks `quantize` makes before any work."""
    from .. import api
    from ..formats.checkpoint import sha256_file
    from ..plan import QuantizeOptions
    options = suite_options()
    kwargs, before = {}, len(problems.lines)
    for key, value in table.items():
        option = options.get(key.replace("_", "-"))
        if option is None:
            problems.add(at, unknown(key, options))
            continue
        value = _option_value(option, value, f"{at}.{key}", base_dir, problems)
        if value is not None:
            kwargs["plan" if option.name == "plan_path" else option.name] = value
    if len(problems.lines) > before:
        return {}, {}
    known = QuantizeOptions.__dataclass_fields__
    opts = QuantizeOptions(**{k: v for k, v in kwargs.items() if k in known})
    try:
        opts.validate()
        api._plan_request(kwargs.get("target_bpw"), kwargs.get("measurement"), kwargs.get("plan"))
    except InputError as e:
        problems.add(at, str(e))
        return {}, {}

    def digest(path):
        return None if path is None else sha256_file(Path(path))

    complete = {**opts.as_dict(), "calib": [c if c == "self" else digest(c) for c in opts.calib],
                "target_bpw": kwargs.get("target_bpw"), "plan": digest(kwargs.get("plan")),
                "measurement": digest(kwargs.get("measurement")), "lossless_rest": kwargs.get("lossless_rest", False)}
    return kwargs, complete


def _option_value(option: click.Option, value, at: str, base_dir: str, problems: Problems):
    """A quantize table's value for `option`, of the option's type (files resolved against the suite's folder);
    None (and a problem) when it is not."""
    if option.is_flag:
        expected, ok = "true or false", type(value) is bool
    elif option.multiple:                                     # --calib: a file, `self`, or an array of them
        value = [value] if isinstance(value, str) else value
        expected = "a string or an array of strings"
        ok = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
        if ok and option.name == "calib":
            value = [v if v == "self" else _file(v, at, base_dir, problems) for v in value]
    elif isinstance(option.type, click.Choice):
        choices = list(option.type.choices)
        expected, ok = f"one of {', '.join(map(repr, choices))}", value in choices
    elif isinstance(option.type, click.types.IntParamType):
        expected, ok = "an integer", type(value) is int
    elif isinstance(option.type, click.types.FloatParamType):
        expected, ok = "a number", type(value) in (int, float) and math.isfinite(value)
        value = float(value) if ok else value
    else:                                                     # --plan, --measurement: files
        expected, ok = "a file name", isinstance(value, str) and value != ""
        if ok:
            value = _file(value, at, base_dir, problems)
    if not ok:
        problems.add(at, f"expected {expected}, got {shown(value)}")
        return None
    return value


def read_golden(path: str) -> dict:
    """The golden file's cases ({} when there is none yet), checked: for each case, when and where it was recorded,
    its fingerprints and a number per metric."""
    from ..formats.paths import read_bytes
    if not os.path.lexists(path):
        return {}
    problems = Problems(path)
    try:
        body = json.loads(read_bytes(path, f"{path}: golden file"))
    except (ValueError, RecursionError) as e:
        why = " ".join(str(e).split())
        raise SuiteError([f"{path}: not a readable golden file ({why}); record it again with --record"]) from None
    if not isinstance(body, dict) or body.get("format_version") != GOLDEN_VERSION:
        raise SuiteError([f"{path}: not a golden file of format_version {GOLDEN_VERSION}; record it again with "
                          "--record" if isinstance(body, dict) else f"{path}: expected a JSON object"])
    cases = body.get("cases")
    if not isinstance(cases, dict):
        raise SuiteError([f"{path}: cases: expected an object of cases"])
    for name, entry in cases.items():
        at = f"cases.{name}"
        if not isinstance(entry, dict):
            problems.add(at, "expected an object")
            continue
        for key in ("recorded", "fingerprints", "metrics"):
            if not isinstance(entry.get(key), dict):
                problems.add(f"{at}.{key}", "missing, or not an object")
        for metric, value in (entry.get("metrics") or {}).items():
            if not (type(value) in (int, float) and math.isfinite(value)):
                problems.add(f"{at}.metrics.{metric}", f"expected a number, got {shown(value)}")
    if problems.lines:
        raise SuiteError(problems.lines)
    return cases


def unrecorded(suite: Suite, cases: list[Case], golden: dict, skipped: set[str]) -> list[str]:
    """A line for each case (or judged metric) with no golden value yet: those cannot be judged."""
    lines = []
    for case in cases:
        record = f"record with: bitsmith regress {suite.path} --record --only {case.name}"
        entry = golden.get(case.name)
        if entry is None:
            lines.append(f"case {case.name}: no golden values yet in {suite.golden_path}; {record}")
            continue
        missing = [m for m, band in case.metrics.items()
                   if band is not None and m not in entry["metrics"] and m not in skipped]
        if missing:
            lines.append(f"case {case.name}: no golden value for {', '.join(missing)} (added since it was recorded); "
                         f"{record}")
    return lines


def write_golden(path: str, suite: str, cases: dict) -> None:
    body = {"format_version": GOLDEN_VERSION, "suite": os.path.basename(suite),
            "note": "measured by `bitsmith regress --record`; record again rather than edit", "cases": cases}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(body, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
