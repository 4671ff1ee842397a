"""`bitsmith regress SUITE.toml`: accuracy-regression runs for CI (bitsmith/regress.py runs the cases, suite.py
reads the files). Exit 0 when every judged metric is inside its band, 1 when one is not, 2 on bad input."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

from .. import harness
from ..formats.errors import InputError
from ..regress import CACHE_NAME, FAILING, LM_EVAL, environment, judge, kind, run_case
from .app import Report, json_option, main
from .suite import SuiteError, read_golden, read_suite, unrecorded, write_golden

STATUS_ORDER = {"error": 0, "regressed": 1, "changed": 2, "improved": 3, "ok": 4, "skipped": 5, "recorded": 6,
                "info": 7}


def _report_path(ctx, param, path: str | None) -> str | None:
    """A report file is checked before any work: a report that cannot be written at the end is lost."""
    if path is not None:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise InputError(f"{param.opts[0]} {path}: the folder {folder} does not exist")
    return path


@main.command()
@click.argument("suite", type=click.Path(dir_okay=False))
@click.option("--record", is_flag=True,
              help="Measure the cases and write their golden values (SUITE's .golden.json), with provenance.")
@click.option("--only", multiple=True, metavar="CASE", help="Run only this case (repeatable, or comma-separated).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), metavar="FILE", callback=_report_path,
              help="Write a JUnit XML report (a testcase per case and metric).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), metavar="FILE", callback=_report_path,
              help="Write a markdown table (for a pull-request comment).")
@json_option("the report")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), metavar="DIR",
              help=f"Folder of cached quantized models (default: {CACHE_NAME} beside SUITE).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cases run side by side, each in a process of its own.")
def regress(suite, record, only, junit_path, markdown_path, json_path, cache_dir, jobs):
    """Quantize and measure every case of SUITE.toml; judge each metric against its golden value and band."""
    try:
        spec = read_suite(suite)
        cases = spec.select(only)
        golden = read_golden(spec.golden_path)
        skipped = {m for c in cases for m in c.metrics if m.startswith(LM_EVAL + ":")} if harness.missing() else set()
        if not record and (missing := unrecorded(spec, cases, golden, skipped)):
            raise SuiteError(missing)
    except SuiteError as e:
        for line in e.lines:
            click.echo(f"error: {line}", err=True)
        sys.exit(2)
    cache = Path(cache_dir) if cache_dir else Path(suite).parent / CACHE_NAME
    click.echo(f"regress: {len(cases)} case{'s' if len(cases) != 1 else ''} of {suite}"
               f"{' (recording)' if record else ''}, cache {cache}", err=True)
    results = _run(cases, cache, jobs)
    here = environment()
    report = _judged(spec, cases, results, golden, record, here)
    if record:
        _record(spec, cases, results, golden, here)
    out = Report(json_path)
    _console(out, report)
    out.json(_plain(report))
    if junit_path:
        _write(junit_path, junit(report))
    if markdown_path:
        _write(markdown_path, markdown(report))
    sys.exit(report["exit_code"])


def _run(cases, cache: Path, jobs: int) -> list[dict]:
    n = len(cases)
    tasks = [(case, cache, f"[{i}/{n}] ") for i, case in enumerate(cases, 1)]
    if jobs == 1 or n == 1:
        return [run_case(*t) for t in tasks]
    import multiprocessing
    context = multiprocessing.get_context("spawn")      # a fresh process per case: its own time and peak memory
    with context.Pool(min(jobs, n), initializer=_worker, initargs=(jobs,), maxtasksperchild=1) as pool:
        return pool.starmap(run_case, tasks)


def _worker(jobs: int) -> None:
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads() // jobs))     # the cores shared among the cases


def _judged(spec, cases, results, golden: dict, record: bool, here: dict) -> dict:
    """The report: per case its rows (one per metric), its fingerprints against the golden's, and notes."""
    out_cases = []
    for case, result in zip(cases, results):
        entry = golden.get(case.name)
        rows = []
        for metric, band in case.metrics.items():
            if result["error"]:
                rows.append({"metric": metric, "status": "error", "detail": result["error"], "severity": math.inf})
                continue
            if metric in result["skipped"]:
                rows.append({"metric": metric, "status": "skipped", "detail": result["skipped"][metric],
                             "severity": 0.0})
                continue
            old = entry["metrics"].get(metric) if entry else None
            row = judge(metric, None if record else band, old, result["values"][metric])
            if record:
                row.update(status="recorded", band_text=band.describe(kind(metric).worse) if band else None)
            elif metric in ("quantize_seconds", "peak_rss_bytes") and result["cache"] == "hit":
                row["detail"] = "from the cached quantize run"
            rows.append(row)
        out_cases.append({"name": case.name, "model": case.model, "cache": result["cache"],
                          "seconds": result.get("seconds"), "error": result["error"],
                          "fingerprints": result["fingerprints"], "notes": _notes(case.name, result, entry, record, here),
                          "golden_recorded": entry["recorded"] if entry else None, "metrics": rows})
    statuses = [r["status"] for c in out_cases for r in c["metrics"]]
    errors = any(c["error"] for c in out_cases)
    counts = {s: statuses.count(s) for s in STATUS_ORDER if s in statuses}
    return {"suite": spec.path, "golden": spec.golden_path, "record": record, "environment": here,
            "exit_code": 2 if errors else 1 if any(s in FAILING for s in statuses) else 0,
            "counts": counts, "cases": out_cases}


def _notes(name: str, result: dict, entry: dict | None, record: bool, here: dict) -> list[str]:
    """Where this run's inputs are not those the golden values were measured on."""
    if record or entry is None or result["error"]:
        return []
    notes = []
    old = entry["fingerprints"]
    for what, now in result["fingerprints"].items():
        if what in old and old[what] != now:
            notes.append(f"{name}: measured on other {what.replace('_', ' ')} than the golden values "
                         f"(fingerprint {old[what][:12]}, now {now[:12]})")
    recorded_threads = entry["recorded"].get("threads")
    if recorded_threads not in (None, result["threads"]):
        notes.append(f"{name}: golden values recorded with {recorded_threads} torch threads, this ran with "
                     f"{result['threads']}: float sums, and so roundings, can differ (set threads in the suite)")
    versions = (entry["recorded"].get("versions") or {})
    for lib, now in here["versions"].items():
        if versions.get(lib) not in (None, now):
            notes.append(f"{name}: golden values recorded with {lib} {versions[lib]}, this is {now}")
    return notes


def _record(spec, cases, results, golden: dict, here: dict) -> None:
    """Write the measured values of the cases that ran (others keep theirs; cases no longer in the suite go)."""
    names = {c.name for c in spec.cases}
    kept = {name: entry for name, entry in golden.items() if name in names}
    for case, result in zip(cases, results):
        if result["error"] is None:
            kept[case.name] = {"recorded": {**here, "cache": result["cache"], "threads": result["threads"]},
                               "fingerprints": result["fingerprints"], "metrics": result["values"]}
    ordered = {c.name: kept[c.name] for c in spec.cases if c.name in kept}
    if not any(result["error"] is None for result in results):
        return
    write_golden(spec.golden_path, spec.path, ordered)
    click.echo(f"regress: wrote {spec.golden_path} ({len(ordered)} case{'s' if len(ordered) != 1 else ''})", err=True)


def _plain(value):
    """`value` with every infinite or NaN float as a string: strict JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise InputError(f"{path}: cannot write the report ({e.strerror})") from None


def _ordered(report: dict) -> list[tuple[dict, dict]]:
    """(case, row) pairs, worst first: failures by the share of their band they use, then the rest."""
    pairs = [(c, r) for c in report["cases"] for r in c["metrics"]]
    return sorted(pairs, key=lambda p: (STATUS_ORDER[p[1]["status"]], -p[1]["severity"]))


def fmt(metric: str, value) -> str:
    if value is None:
        return "-"
    return format(value, kind(metric).digits) if math.isfinite(value) else str(value)


def change_text(row: dict) -> str:
    if row.get("change") is None:
        return "-"
    rel = row.get("change_rel")
    return f"{row['change']:+.4g}" + (f" ({100 * rel:+.2f}%)" if rel is not None else "")


def _cells(case: dict, row: dict) -> list[str]:
    metric = row["metric"]
    return [row["status"].upper() if row["status"] in FAILING else row["status"], case["name"], metric,
            fmt(metric, row.get("golden")), fmt(metric, row.get("measured")), change_text(row),
            row.get("band_text") or "-"]


HEAD = ["status", "case", "metric", "golden", "measured", "change", "band"]


def _console(out: Report, report: dict) -> None:
    rows = [HEAD] + [_cells(c, r) for c, r in _ordered(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    for r in rows:
        out.line("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for c in report["cases"]:
        for note in c["notes"]:
            out.note(f"note: {note}")
        if c["error"]:
            click.echo(f"error: {c['name']}: {c['error']}", err=True)
    out.note(f"regress: {summary(report)}")


def summary(report: dict) -> str:
    counts = report["counts"]
    words = ", ".join(f"{n} {s}" for s, n in counts.items())
    verdict = {0: "every judged metric inside its band", 1: "FAILED", 2: "BAD INPUT"}[report["exit_code"]]
    if report["record"]:
        verdict = "golden values recorded" if report["exit_code"] != 2 else verdict
    stale = "; improved beyond a band: the golden values may be stale, record them again" \
        if counts.get("improved") else ""
    return f"{verdict}: {words}{stale}"


def markdown(report: dict) -> str:
    """A table for a pull-request comment: worst first, notes and provenance below."""
    env = report["environment"]
    lines = [f"### bitsmith regress: `{report['suite']}`", "", f"**{summary(report)}**", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for c, r in _ordered(report):
        cells = _cells(c, r)
        if r["status"] in FAILING:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    notes = [n for c in report["cases"] for n in c["notes"]] + \
            [f"{c['name']}: {c['error']}" for c in report["cases"] if c["error"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "<details><summary>provenance</summary>", "",
              f"- this run: {env['date']}, {_machine(env)}, {_versions(env)}"]
    for c in report["cases"]:
        if c["golden_recorded"]:
            g = c["golden_recorded"]
            lines.append(f"- golden `{c['name']}`: {g.get('date')}, {_machine(g)}, {_versions(g)}")
        lines.append(f"- `{c['name']}` cache: {c['cache'] or 'not quantized here'}, {c['seconds'] or 0:.1f} s")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def _machine(env: dict) -> str:
    m = env.get("machine") or {}
    return f"{m.get('host')} ({m.get('arch')}, {m.get('cpu_capability')}, torch threads {m.get('torch_threads')})"


def _versions(env: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())


def junit(report: dict) -> str:
    """JUnit XML: a testsuite per suite, a testcase per case and metric; a regression is a failure naming the
    golden value, the band and the measured value; bad input met by a case is an error; skipped metrics skip."""
    import xml.etree.ElementTree as ET
    counts = report["counts"]
    name = Path(report["suite"]).stem
    total = sum(counts.values())
    failures = counts.get("regressed", 0) + counts.get("changed", 0)
    attrs = {"name": name, "tests": str(total), "failures": str(failures), "errors": str(counts.get("error", 0)),
             "skipped": str(counts.get("skipped", 0)),
             "time": f"{sum(c['seconds'] or 0 for c in report['cases']):.3f}"}
    root = ET.Element("testsuites", {**attrs, "name": "bitsmith regress"})
    suite = ET.SubElement(root, "testsuite", {**attrs, "timestamp": report["environment"]["date"]})
    props = ET.SubElement(suite, "properties")
    for key, value in [("golden", report["golden"]), *report["environment"]["versions"].items(),
                       *((f"machine.{k}", v) for k, v in report["environment"]["machine"].items())]:
        ET.SubElement(props, "property", {"name": key, "value": str(value)})
    for c in report["cases"]:
        share = (c["seconds"] or 0) / max(len(c["metrics"]), 1)
        for r in c["metrics"]:
            case = ET.SubElement(suite, "testcase", {"classname": f"{name}.{c['name']}", "name": r["metric"],
                                                     "time": f"{share:.3f}"})
            text = _detail(c, r)
            if r["status"] in ("regressed", "changed"):
                ET.SubElement(case, "failure", {"type": r["status"], "message": _message(c, r)}).text = text
            elif r["status"] == "error":
                ET.SubElement(case, "error", {"type": "bad input", "message": r["detail"]}).text = r["detail"]
            elif r["status"] == "skipped":
                ET.SubElement(case, "skipped", {"message": r["detail"]})
            else:
                ET.SubElement(case, "system-out").text = text
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _message(case: dict, row: dict) -> str:
    metric = row["metric"]
    return (f"{case['name']} {metric} {row['status']}: measured {fmt(metric, row['measured'])}, golden "
            f"{fmt(metric, row['golden'])}, band {row['band_text']} (change {change_text(row)})")


def _detail(case: dict, row: dict) -> str:
    metric = row["metric"]
    worse = kind(metric).worse
    lines = [f"status: {row['status']}", f"golden: {fmt(metric, row.get('golden'))}",
             f"measured: {fmt(metric, row.get('measured'))}", f"change: {change_text(row)}",
             f"band: {row.get('band_text') or '-'}" + (f" ({worse} is worse)" if worse else " (informative)")]
    if row.get("detail"):
        lines.append(row["detail"])
    lines += case["notes"]
    return "\n".join(lines)
