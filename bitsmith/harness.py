"""Tasks of lm-evaluation-harness (lm-eval) on a loaded model: `bitsmith eval --tasks` and the `lm_eval` metrics of
`bitsmith regress`. The model is bitsmith's (`api.load`, any checkpoint bitsmith reads) wrapped in lm-eval's `hf`
backend (HFLM), so the scores are those of the quantized weights as bitsmith runs them.

Tasks need their data where this machine can read it. lm-eval's own ways are kept: its datasets come from the
Hugging Face datasets cache (set HF_DATASETS_OFFLINE=1 to use a populated cache without a network), and
`include_path` folders add task YAMLs whose `dataset_path` / `dataset_kwargs.data_files` name local files (e.g.
`dataset_path: json` with `data_files: {test: /data/arc_easy_test.jsonl}`; relative data files are read from the
current directory, as lm-eval reads them).
"""
from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from .formats.errors import InputError, one_line

INSTALL = "pip install 'bitsmith[lm-eval]'"


@dataclass(frozen=True)
class TaskSpec:
    """Which lm-eval tasks to run and how (lm-eval's `simple_evaluate` arguments of the same names)."""
    tasks: tuple[str, ...]
    limit: int | None = None             # the first N documents of each task
    num_fewshot: int | None = None       # None: each task's own default
    batch_size: int = 1
    include_path: tuple[str, ...] = ()   # folders of extra task YAMLs (local datasets)


def missing() -> str | None:
    """Why lm-eval tasks cannot run here, or None."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"lm-eval is not installed ({INSTALL})"
    return None


def parse_tasks(text: str) -> tuple[str, ...]:
    """`hellaswag,arc_easy` -> ("hellaswag", "arc_easy"); empty names refused."""
    names = tuple(t.strip() for t in text.split(","))
    if not all(names):
        raise InputError(f"--tasks {text!r}: give task names separated by commas, e.g. hellaswag,arc_easy")
    return names


def prepare(spec: TaskSpec):
    """lm-eval's task manager for `spec`, its tasks loaded once to check them: unknown names, task files lm-eval
    cannot read and data that cannot be read are refused here, before any model is loaded."""
    why = missing()
    if why:
        raise InputError(f"--tasks needs lm-eval: {why}")
    for folder in spec.include_path:
        if not Path(folder).is_dir():
            raise InputError(f"--include-path {folder}: not a folder")
    from lm_eval.tasks import TaskManager
    try:
        manager = TaskManager(include_path=list(spec.include_path) or None)
    except Exception as e:                  # a task YAML lm-eval cannot index: the user's file, not a bitsmith fault
        raise InputError(f"--include-path: lm-eval cannot read its task files ({one_line(e)})") from e
    unknown = [t for t in spec.tasks if not manager.match_tasks([t])]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (`lm-eval ls tasks` lists them)"
        raise InputError(f"unknown lm-eval task {', '.join(unknown)}{hint}")
    try:
        load = getattr(manager, "load", None) or manager.load_task_or_group    # newer lm-eval / older
        load(list(spec.tasks))                  # reads each task's data once (the datasets cache keeps it)
    except Exception as e:                  # missing data, no network, a malformed task: lm-eval's or datasets' error
        raise InputError(f"lm-eval tasks {', '.join(spec.tasks)}: could not be loaded ({one_line(e)}); give local "
                         "copies of their data with --include-path, or a populated datasets cache") from e
    return manager


def scores(result: dict) -> dict[str, dict[str, float]]:
    """lm-eval's `results` as {task: {metric: value}}: the filter "none" dropped from the names (`acc,none` ->
    `acc`, other filters kept: `exact_match,strict-match`), non-numeric entries (alias, name) left out."""
    table = {}
    for task, reported in (result or {}).get("results", {}).items():
        row = {}
        for key, value in reported.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len":
                name, _, filt = key.partition(",")
                row[name if filt in ("", "none") else key] = float(value)
        table[task] = row
    return table


def run(model: str, spec: TaskSpec, manager=None) -> dict:
    """lm-eval's scores of `model` (any checkpoint `bitsmith.load` reads) on `spec.tasks`, with the task manager
    `prepare` made (made here when not given): {"tasks": {task: {metric: value}}, "lm_eval": {version,
    num_fewshot, limit, batch_size}}."""
    manager = manager or prepare(spec)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from . import api
    from .formats.source import open_source
    from .kernels.linear import cache_dequantized
    net = api.load(model)
    cache_dequantized(net)
    hf = logging.getLogger("lm_eval.models.huggingface")
    level = hf.level
    hf.setLevel(logging.ERROR)      # its warnings that a built model was passed: passing one is the point here
    try:
        lm = HFLM(pretrained=net, tokenizer=open_source(model).tokenizer(), batch_size=spec.batch_size)
    finally:
        hf.setLevel(level)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), task_manager=manager,
                                  num_fewshot=spec.num_fewshot, limit=spec.limit, log_samples=False)
    return {"tasks": scores(out),
            "lm_eval": {"version": importlib.metadata.version("lm_eval"), "num_fewshot": spec.num_fewshot,
                        "limit": spec.limit, "batch_size": spec.batch_size}}
