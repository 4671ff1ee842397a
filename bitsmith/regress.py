"""Accuracy-regression runs (`bitsmith regress`): each case of a suite quantizes a model (or takes a quantized
one), measures it, and every metric is judged against a golden value measured earlier, inside a band.

Quantized outputs are cached under a key made of the fingerprints of everything that decides their bytes: the
source model, the quantize options (calibration, plan and measurement files by their sha256), and the versions of
bitsmith, torch and transformers. An unchanged case run again measures the cached folder and quantizes nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, harness
from .formats.errors import InputError
from .harness import TaskSpec

GOLDEN_VERSION = 1
CACHE_NAME = ".bitsmith-regress-cache"
LM_EVAL = "lm_eval"                 # metrics `lm_eval:<task>`, one per task of the case's lm_eval table
FAILING = ("regressed", "changed", "error")      # statuses that fail a run


@dataclass(frozen=True)
class MetricKind:
    worse: str | None    # "higher" or "lower": the direction a regression moves; None: informative, never judged
    needs: str           # "eval" (a text), "base" (a text and the unquantized model), "checkpoint" (a bitsmith
                         # folder), "quantize" (a quantize run), "lm_eval"
    digits: str          # how values print


METRICS = {
    "perplexity": MetricKind("higher", "eval", ".4f"),
    "kl": MetricKind("higher", "base", ".5f"),                    # mean KL(base || model), nats per token
    "top1": MetricKind("lower", "base", ".4f"),                   # top-1 agreement with the base model
    "bpw": MetricKind("higher", "checkpoint", ".4f"),             # all-in bits per quantized weight
    "output_bytes": MetricKind("higher", "checkpoint", ",.0f"),   # the safetensors files, as quantize reports
    "quantize_seconds": MetricKind(None, "quantize", ".1f"),
    "peak_rss_bytes": MetricKind(None, "quantize", ",.0f"),
}
LM_EVAL_KIND = MetricKind("lower", "lm_eval", ".4f")


def kind(metric: str) -> MetricKind:
    return LM_EVAL_KIND if metric.startswith(LM_EVAL + ":") else METRICS[metric]


@dataclass(frozen=True)
class Band:
    """How far a measured value may move from its golden value: `abs` + `rel` x |golden|, the worse way only, or
    either way with `both` (a value that should not move at all, such as a size)."""
    abs: float = 0.0
    rel: float = 0.0
    both: bool = False

    def allowed(self, golden: float) -> float:
        return self.abs + self.rel * abs(golden)

    def describe(self, worse: str) -> str:
        sign = "±" if self.both else ("+" if worse == "higher" else "-")
        parts = ([f"{self.abs:g}"] if self.abs or not self.rel else []) + ([f"{100 * self.rel:g}%"] if self.rel else [])
        return sign + (" + ".join(parts) if len(parts) == 1 else f"({' + '.join(parts)})")

    def as_dict(self) -> dict:
        return {"abs": self.abs, "rel": self.rel, "side": "both" if self.both else "worse"}


@dataclass(frozen=True)
class EvalSpec:
    data: str
    seqlen: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class LMEvalSpec(TaskSpec):
    metric: str = "acc"         # the score of each task that is judged


@dataclass
class Case:
    """One case of a suite, as the suite file gives it (paths resolved)."""
    name: str
    model: str                     # bundled name, model folder or .gguf, or a bitsmith folder to measure as it is
    base: str | None               # the model KL and top-1 compare against
    quantize: dict | None          # keyword arguments of `api.quantize`; None: `model` is measured as it is
    options: dict                  # everything the case does, files by their sha256 (its "options" fingerprint)
    eval: EvalSpec | None
    lm_eval: LMEvalSpec | None
    metrics: dict[str, Band | None] = field(default_factory=dict)   # metric -> band (None: informative)
    threads: int | None = None     # torch threads the case runs with; None: the process's


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def environment() -> dict:
    """Where and with what a measurement was made: date, machine, library versions."""
    import torch
    import transformers
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "platform": platform.platform(), "arch": platform.machine(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "versions": {"bitsmith": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version(),
                         **({} if harness.missing() else {"lm_eval": importlib.metadata.version("lm_eval")})}}


def run_case(case: Case, cache: Path, position: str = "") -> dict:
    """Quantize (or take from the cache), measure; the values, fingerprints and what the cache did. Bad input met
    on the way (a window longer than the context, say) ends the case with `error` set; other cases go on."""
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"{position}{case.name}: {text}", file=sys.stderr, flush=True)

    import torch
    threads = torch.get_num_threads()
    result = {"name": case.name, "cache": None, "values": {}, "skipped": {}, "fingerprints": {}, "error": None,
              "quantize": None, "threads": case.threads or threads}
    torch.set_num_threads(result["threads"])
    try:
        folder, summary, result["cache"], source = _checkpoint(case, cache, say)
        result["quantize"] = summary
        result["fingerprints"] = _fingerprints(case, folder, source)
        result["values"], result["skipped"] = _measure(case, folder, summary, say)
    except InputError as e:
        result["error"] = str(e)
        say(f"error: {e}")
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = time.perf_counter() - started
    if result["error"] is None:
        say(f"done in {result['seconds']:.1f} s")
    return result


def _checkpoint(case: Case, cache: Path, say) -> tuple[str, dict | None, str | None, str]:
    """(the folder to measure, the quantize summary, "hit"/"miss"/None, the source model's fingerprint)."""
    from . import api
    from .formats.checkpoint import verify
    from .formats.source import open_source
    if case.quantize is None:
        return case.model, None, None, open_source(case.model).fingerprint()
    source = open_source(case.model).fingerprint()
    key = cache_key(case, source)
    entry = cache / key[:32]
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# bitsmith regress: cached quantized models\n*\n")
    with _locked(cache / f".{key[:32]}.lock"):       # cases (or CI jobs) sharing an entry quantize it once
        summary_path = entry / "quantize.json"
        if summary_path.is_file():
            problems = verify(entry / "model")
            if not problems:
                say(f"cached quantized model {entry.name} (no quantization)")
                return str(entry / "model"), json.loads(summary_path.read_text()), "hit", source
            say(f"cached model {entry.name} is damaged ({problems[0]}); quantizing again")
            summary_path.unlink()
        say(f"quantizing ({_describe(case.quantize)}) ...")
        summary = api.quantize(case.model, str(entry / "model"), overwrite=True, progress=False, **case.quantize)
        _write_atomically(entry / "key.json", json.dumps(_key_body(case, source), indent=1) + "\n")
        _write_atomically(summary_path, json.dumps(summary, indent=1, default=str) + "\n")
        say(f"quantized in {summary['seconds']:.1f} s, {summary['bits_per_weight']:.3f} bits per weight")
        return str(entry / "model"), summary, "miss", source


def cache_key(case: Case, source_fingerprint: str) -> str:
    return sha256_json(_key_body(case, source_fingerprint))


def _key_body(case: Case, source_fingerprint: str) -> dict:
    import torch
    import transformers
    return {"bitsmith": __version__, "code": code_fingerprint(), "torch": torch.__version__,
            "transformers": transformers.__version__, "source": source_fingerprint,
            "quantize": case.options["quantize"], "threads": case.options.get("threads")}


@functools.cache
def code_fingerprint() -> str:
    """sha256 of bitsmith's own code, every module of its packages but the command line's: a model cached by other
    code is not reused, even under the same version number (a change being tested is one)."""
    from . import api  # noqa: F401  (imports every package a quantize run uses)
    h = hashlib.sha256()
    for name in sorted(n for n, m in list(sys.modules.items())
                       if n.split(".")[0] == "bitsmith" and hasattr(m, "__path__") and n != "bitsmith.cli"):
        for folder in sys.modules[name].__path__:
            for f in sorted(Path(folder).glob("*.py")):
                h.update(f"{name}/{f.name}\0".encode() + f.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in kwargs.items())


def _fingerprints(case: Case, folder: str, source: str) -> dict:
    """sha256 fingerprints of what the values depend on: the unquantized model, the calibration windows, the
    quantized weights, the evaluation text and the case's settings (and the base model when it is another)."""
    from .formats.checkpoint import MANIFEST, Checkpoint, listed_files, sha256_file
    from .formats.source import open_source
    prints = {"source": source}
    if (Path(folder) / MANIFEST).exists():
        manifest = Checkpoint(folder).manifest
        prints["source"] = (manifest.get("source") or {}).get("fingerprint", source)
        prints["calibration"] = (manifest.get("calibration") or {}).get("fingerprint", "")
        files = listed_files(manifest, Path(folder) / MANIFEST)
        prints["weights"] = sha256_json({n: d for n, d in files.items() if n.endswith(".safetensors")})
    if case.eval is not None:
        prints["eval_data"] = sha256_file(Path(case.eval.data))
    if case.base is not None and case.base != case.model:
        prints["base"] = open_source(case.base).fingerprint()
    prints["options"] = sha256_json(case.options)
    return prints


def _measure(case: Case, folder: str, summary: dict | None, say) -> tuple[dict, dict]:
    from . import api
    values, skipped = {}, {}
    wanted = set(case.metrics)
    if case.eval is not None and wanted & {"perplexity", "kl", "top1"}:
        base = case.base if wanted & {"kl", "top1"} else None
        say(f"evaluating on {case.eval.data}" + (f" against {base}" if base else "") + " ...")
        r = api.evaluate(folder, case.eval.data, seqlen=case.eval.seqlen, max_tokens=case.eval.max_tokens,
                         base=base, progress=False)
        values["perplexity"] = r["perplexity"]
        if base:
            values["kl"], values["top1"] = r["kl"], r["top1_agreement"]
    if wanted & {"bpw", "output_bytes"}:
        from .formats.inspect import layer_table
        values["bpw"] = layer_table(folder)[1]["bpw"]
        values["output_bytes"] = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    if summary is not None:
        values["quantize_seconds"], values["peak_rss_bytes"] = summary["seconds"], summary["peak_rss_bytes"]
    if case.lm_eval is not None:
        missing = harness.missing()
        if missing:
            skipped.update({m: missing for m in case.metrics if m.startswith(LM_EVAL + ":")})
        else:
            say(f"lm-eval tasks {', '.join(case.lm_eval.tasks)} ...")
            values.update(_lm_eval(folder, case.lm_eval))
    return {m: v for m, v in values.items() if m in wanted}, skipped


def _lm_eval(folder: str, spec: LMEvalSpec) -> dict:
    """The judged score of each lm-eval task on the quantized model."""
    reported = harness.run(folder, spec)["tasks"]
    scores = {}
    for task in spec.tasks:
        value = reported.get(task, {}).get(spec.metric)
        if value is None:
            raise InputError(f"lm-eval task {task} reports no {spec.metric} (it reports: "
                             f"{', '.join(sorted(reported.get(task, {}))) or 'nothing'})")
        scores[f"{LM_EVAL}:{task}"] = value
    return scores


def judge(metric: str, band: Band | None, golden: float | None, measured: float) -> dict:
    """One metric against its golden value: status ok, improved (beyond the band the better way: the golden is
    stale), regressed (beyond it the worse way), changed (beyond a two-sided band the better way), or info; the
    change, and `severity`, the share of the band used the worse way (above 1: outside)."""
    worse = kind(metric).worse
    row = {"metric": metric, "golden": golden, "measured": measured, "band": band.as_dict() if band else None,
           "band_text": band.describe(worse) if band else None, "change": None, "change_rel": None, "allowed": None,
           "severity": 0.0}
    if golden is not None and measured is not None:
        row["change"] = measured - golden
        row["change_rel"] = (measured - golden) / abs(golden) if golden else None
    if band is None or worse is None:
        return {**row, "status": "info"}
    allowed = band.allowed(golden)
    worsening = (measured - golden) * (1 if worse == "higher" else -1)
    slack = 1e-12 * max(1.0, abs(golden))      # the float noise of a value written to JSON and read back
    row["allowed"] = allowed
    if not math.isfinite(measured):
        return {**row, "status": "regressed", "severity": math.inf}
    moved = abs(worsening) if band.both else worsening
    row["severity"] = moved / allowed if allowed else (math.inf if moved > slack else 0.0)
    if worsening > allowed + slack:
        return {**row, "status": "regressed"}
    if -worsening > allowed + slack:
        return {**row, "status": "changed" if band.both else "improved"}
    return {**row, "status": "ok"}
