"""lm-eval tasks on bitsmith's models (`bitsmith eval --tasks`, regress's `lm_eval` metrics): run with the real
lm-evaluation-harness on stories260K and a local multiple-choice task, and checked against a log-likelihood
computed here without lm-eval."""
from __future__ import annotations

import itertools
import json
import random
import textwrap

import pytest
import torch
from click.testing import CliRunner

from bitsmith import api, harness
from bitsmith.cli.main import main
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source
from bitsmith.kernels.linear import cache_dequantized


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_scores_drop_the_plain_filter_and_keep_the_others():
    reported = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                         "acc_norm,none": 0.6, "sample_len": 100},
                            "gsm8k": {"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.25}}}
    assert harness.scores(reported) == {
        "arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.6},
        "gsm8k": {"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.25}}
    assert harness.scores({}) == {}


@pytest.mark.parametrize("text", ["", "a,,b", ",", "hellaswag, "])
def test_task_lists_with_an_empty_name_are_refused(text):
    with pytest.raises(InputError, match="task names separated by commas"):
        harness.parse_tasks(text)
    assert harness.parse_tasks("hellaswag, arc_easy") == ("hellaswag", "arc_easy")


def test_missing_lm_eval_is_one_line_exit_2(monkeypatch, stories_path):
    monkeypatch.setattr(harness, "missing", lambda: "lm-eval is not installed (pip install 'bitsmith[lm-eval]')")
    r = run("eval", stories_path, "--tasks", "hellaswag")
    assert r.exit_code == 2 and r.output.strip() == (
        "error: --tasks needs lm-eval: lm-eval is not installed (pip install 'bitsmith[lm-eval]')")


def test_eval_needs_a_text_or_tasks(stories_path):
    r = run("eval", stories_path)
    assert r.exit_code == 2 and "give --data FILE" in r.output
    r = run("eval", stories_path, "--data", "x.txt", "--limit", "5")
    assert r.exit_code == 2 and "apply to --tasks" in r.output


# A local multiple-choice task: a story's opening, its true next sentence against the same words shuffled.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory, stories_split):
    """(folder of the task YAML, task name, its documents) built from held-out TinyStories text."""
    pytest.importorskip("lm_eval")
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    sentences = [s.strip() + "." for s in stories_split[1].read_text().replace("\n", " ").split(".")]
    docs = []
    for a, b in itertools.pairwise(sentences):
        words = b.rstrip(".").split()
        if len(a) < 20 or not 5 <= len(words) <= 12:
            continue
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        answer = rng.randrange(2)
        choices = [b, " ".join(shuffled) + "."][::1 if answer == 0 else -1]
        docs.append({"context": a, "choices": choices, "answer": answer})
        if len(docs) == 24:
            break
    data = folder / "story_order.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "story_order.yaml").write_text(TASK_YAML.format(name="story_order", data=data))
    return folder, "story_order", docs


def log_likelihood(net, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as a whole and split where the context's tokens end."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = net(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logits[i - 1, whole[i]].item() for i in range(start, len(whole)))


def accuracy(model: str, docs: list[dict]) -> float:
    net = api.load(model)
    cache_dequantized(net)
    tokenizer = open_source(model).tokenizer()
    right = 0
    for d in docs:
        scores = [log_likelihood(net, tokenizer, d["context"], " " + c) for c in d["choices"]]
        right += max(range(len(scores)), key=scores.__getitem__) == d["answer"]
    return right / len(docs)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, stories_path):
    out = tmp_path_factory.mktemp("q") / "w3"
    assert run("quantize", stories_path, "-o", out, "--method", "rtn", "--bits", "3", "--group-size", "32"
               ).exit_code == 0
    return out


@pytest.mark.slow
def test_eval_tasks_score_the_quantized_model_as_its_log_likelihoods_say(task, quantized, stories_path):
    folder, name, docs = task
    r = run("eval", quantized, "--tasks", name, "--include-path", folder, "--json", "-")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    measured = result["tasks"][name]["acc"]
    assert measured == pytest.approx(accuracy(str(quantized), docs), abs=1e-9)
    assert result["lm_eval"]["version"] and result["data"] is None
    base = accuracy(str(stories_path), docs)
    assert base > 0.6, "the task should be one the base model mostly gets right"


@pytest.mark.slow
def test_eval_text_and_tasks_in_one_json(task, quantized, stories_split):
    folder, name, docs = task
    r = run("eval", quantized, "--data", stories_split[1], "--seqlen", "128", "--max-tokens", "512",
            "--tasks", name, "--include-path", folder, "--limit", "8", "--json", "-")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tokens"] == 512 and result["perplexity"] > 1
    assert result["tasks"][name]["acc"] == pytest.approx(accuracy(str(quantized), docs[:8]), abs=1e-9)
    assert result["lm_eval"]["limit"] == 8


@pytest.mark.slow
def test_unknown_tasks_and_unreadable_data_are_refused_before_any_model_work(task, quantized, tmp_path):
    folder, name, _ = task
    r = run("eval", quantized, "--tasks", "story_ordr", "--include-path", folder)
    assert r.exit_code == 2 and r.output.startswith("error: unknown lm-eval task story_ordr (did you mean story_order")
    assert len(r.output.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gone.yaml").write_text(TASK_YAML.format(name="gone", data=tmp_path / "nowhere.jsonl"))
    r = run("eval", quantized, "--tasks", "gone", "--include-path", broken)
    assert r.exit_code == 2 and r.output.startswith("error: lm-eval tasks gone: could not be loaded (")
    assert len(r.output.strip().splitlines()) == 1
    r = run("eval", quantized, "--tasks", name, "--include-path", tmp_path / "absent")
    assert r.exit_code == 2 and "not a folder" in r.output


@pytest.mark.slow
def test_regress_judges_lm_eval_scores_against_recorded_ones(task, quantized, tmp_path):
    folder, name, docs = task
    (tmp_path / "s.toml").write_text(textwrap.dedent(f"""\
        [[case]]
        name = "tasks"
        model = "{quantized}"
        metrics.lm_eval = {{ tasks = ["{name}"], include_path = ["{folder}"], abs = 0.0 }}
        """))
    r = run("regress", tmp_path / "s.toml", "--record")
    assert r.exit_code == 0, r.output
    golden = json.loads((tmp_path / "s.golden.json").read_text())
    recorded = golden["cases"]["tasks"]["metrics"][f"lm_eval:{name}"]
    assert recorded == pytest.approx(accuracy(str(quantized), docs), abs=1e-9)
    assert golden["cases"]["tasks"]["recorded"]["versions"]["lm_eval"]
    r = run("regress", tmp_path / "s.toml", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cases"][0]["metrics"][0]["status"] == "ok"
    golden["cases"]["tasks"]["metrics"][f"lm_eval:{name}"] = recorded + 0.05      # a golden the model now misses
    (tmp_path / "s.golden.json").write_text(json.dumps(golden))
    r = run("regress", tmp_path / "s.toml", "--junit", tmp_path / "r.xml")
    assert r.exit_code == 1 and r.stdout.splitlines()[1].split()[:3] == ["REGRESSED", "tasks", f"lm_eval:{name}"]
    assert "<failure" in (tmp_path / "r.xml").read_text()
