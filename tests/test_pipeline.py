"""The quantize job with learned rounding (`--rounding signround`, `--rounding gptaq`) and with end-to-end tuning
(`--tune-epochs`), bitsmith/pipeline.py, on stories260K: the checkpoint keeps its layouts (tuning changes only
scales, tables and norm weights) and loads to the perplexity measured while quantizing, a killed run resumes to
the same bytes, and the options are checked and part of a run's identity."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import bitsmith
from bitsmith import pipeline
from bitsmith.calibration import data
from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.perplexity import evaluate
from bitsmith.formats import faults
from bitsmith.formats.checkpoint import verify
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source
from bitsmith.pipeline import linear_shapes
from bitsmith.plan import QuantizeOptions
from bitsmith.resume import _difference, identity

OPTIONS = {"method": "gptq", "bits": 3, "group_size": 32, "nsamples": 16, "seqlen": 128, "seed": 0,
           "rounding_iters": 20}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stories_path, stories_split):
    """(folder, summary) of a GPTQ run, of the same run with learned rounding and toward the unquantized outputs."""
    calib, held = stories_split
    folder = tmp_path_factory.mktemp("rounding")
    return {rounding: (folder / rounding, bitsmith.quantize(
                str(stories_path), str(folder / rounding), calib=[str(calib)], eval_data=str(held), eval_seqlen=256,
                progress=False, rounding=rounding, **OPTIONS))
            for rounding in ("gptq", "signround", "gptaq")}


@pytest.mark.parametrize("rounding", ["signround", "gptaq"])
def test_the_checkpoint_loads_to_the_perplexity_measured_while_quantizing(runs, stories_split, rounding):
    out, summary = runs[rounding]
    assert verify(out) == []
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"]) == ("gptq", 3, 32, True)
    ids = data.tokenize(open_source(str(out)).tokenizer(), stories_split[1].read_text())
    loaded = evaluate(bitsmith.load(str(out)), data.eval_windows(ids, 256), progress=False)
    assert loaded["tokens"] == summary["eval"]["tokens"]
    assert loaded["perplexity"] == summary["eval"]["perplexity"]


def test_learned_rounding_changes_the_codes_and_lowers_the_perplexity(runs):
    (gptq_out, gptq), (out, learned) = runs["gptq"], runs["signround"]
    plain, refined = load_file(str(gptq_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert plain.keys() == refined.keys()
    assert all(plain[n].shape == refined[n].shape and plain[n].dtype == refined[n].dtype for n in plain)
    qweights = [n for n in plain if n.endswith(".qweight")]
    assert len(qweights) == 35 and all(not torch.equal(plain[n], refined[n]) for n in qweights)
    first = [n for n in plain if n.startswith("model.layers.0.") and n.endswith(".g_idx")]
    assert len(first) == 7 and all(torch.equal(plain[n], refined[n]) for n in first)     # GPTQ's group order kept
    assert learned["bits_per_weight"] == gptq["bits_per_weight"]
    assert learned["eval"]["perplexity"] < gptq["eval"]["perplexity"]


@pytest.mark.parametrize("rounding", ["signround", "gptaq"])
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, runs, stories_path, stories_split, rounding):
    """The unquantized stream (the targets) is replayed through the finished blocks like the quantized one."""
    calib = stories_split[0]
    args = ["quantize", str(stories_path), "-o", str(tmp_path / "out"), "--calib", str(calib), "--bits", "3",
            "--group-size", "32", "--nsamples", "16", "--seqlen", "128", "--rounding", rounding,
            "--rounding-iters", "20"]
    code = "import sys; from bitsmith.cli.main import main; main(sys.argv[1:], prog_name='bitsmith')"
    run = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, faults.VARIABLE: "block:2"},
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == -9, run.stderr
    bitsmith.quantize(str(stories_path), str(tmp_path / "out"), calib=[str(calib)], progress=False,
                      rounding=rounding, resume=True, **OPTIONS)
    bitsmith.quantize(str(stories_path), str(tmp_path / "whole"), calib=[str(calib)], progress=False,
                      rounding=rounding, **OPTIONS)
    for name in ("model.safetensors", "config.json", "plan.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_rounding_is_part_of_the_identity_a_resumed_run_must_share():
    runs = [identity("v", "m", QuantizeOptions(**options), "c", None, False)
            for options in ({"rounding": "signround"}, {"rounding": "gptq"}, {"rounding": "signround",
                                                                               "rounding_iters": 25})]
    assert _difference(runs[0], runs[1]) == ("this run has --rounding gptq, the interrupted one had --rounding "
                                             "signround")
    assert _difference(runs[0], runs[2]) == ("this run has --rounding-iters 25, the interrupted one had "
                                             "--rounding-iters 50")


@pytest.mark.parametrize("options,message", [
    ({"rounding": "adaround"}, "--rounding adaround: choose one of gptq, gptaq, signround"),
    ({"rounding": "signround", "method": "rtn"}, "--rounding signround works on GPTQ's weights; --method rtn is not gptq"),
    ({"rounding": "signround", "method": "qoq"}, "--rounding signround works on GPTQ's weights; --method qoq is not gptq"),
    ({"rounding": "gptaq", "method": "rtn"}, "--rounding gptaq works on GPTQ's weights; --method rtn is not gptq"),
    ({"rounding_iters": -1}, "--rounding-iters -1: expected 0 or more iterations per block"),
])
def test_bad_rounding_options_are_refused(options, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(") + "$"):
        QuantizeOptions(**options).validate()


def test_quantizing_toward_the_unquantized_outputs_changes_the_codes_and_lowers_the_perplexity(runs):
    (gptq_out, gptq), (out, toward) = runs["gptq"], runs["gptaq"]
    plain, other = load_file(str(gptq_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert plain.keys() == other.keys() and toward["bits_per_weight"] == gptq["bits_per_weight"]
    qweights = [n for n in plain if n.endswith(".qweight")]
    first = [n for n in qweights if n.startswith("model.layers.0.self_attn.") and not n.endswith("o_proj.qweight")]
    assert len(first) == 3 and all(torch.equal(plain[n], other[n]) for n in first)   # same inputs in both models
    assert sum(not torch.equal(plain[n], other[n]) for n in qweights) >= 0.75 * (len(qweights) - 3)   # 28 of 32
    assert toward["eval"]["perplexity"] < gptq["eval"]["perplexity"]


def test_gptaq_quantizes_every_layout_of_a_plan(tmp_path, stories_path, stories_split):
    """Toward the unquantized outputs works on the weight GPTQ starts from, whatever the layout: a plan with lookup
    tables, per-input-channel grids, outliers and plain grids keeps every layout's tensors, the first stage of
    block 0 (the same inputs in both models) keeps GPTQ's codes, and the checkpoint loads to the perplexity measured
    while quantizing."""
    calib, held = stories_split
    names = linear_shapes(BlockRunner(open_source(str(stories_path)).config))

    def entry(name):
        if "up_proj" in name:
            return {"bits": 3, "group_size": -1, "sym": False, "lut": True}
        if "q_proj" in name or "k_proj" in name or "v_proj" in name:
            return {"bits": 3, "group_size": 32, "sym": False, "per_ic": True}
        if "down_proj" in name:
            return {"bits": 3, "group_size": 32, "sym": False, "outliers": 0.01}
        return {"bits": 4, "group_size": 32, "sym": True}
    (tmp_path / "plan.json").write_text(json.dumps({"layers": {name: entry(name) for name in names}}))
    runs = {}
    for rounding in ("gptq", "gptaq"):
        out = tmp_path / rounding
        summary = bitsmith.quantize(str(stories_path), str(out), plan=str(tmp_path / "plan.json"), calib=[str(calib)],
                                    eval_data=str(held), eval_seqlen=256, progress=False, rounding=rounding,
                                    **{k: v for k, v in OPTIONS.items() if k not in ("bits", "group_size")})
        runs[rounding] = (out, summary, load_file(str(out / "model.safetensors")))
    (_, _, plain), (out, summary, toward) = runs["gptq"], runs["gptaq"]
    assert {k: (v.shape, v.dtype) for k, v in plain.items()} == {k: (v.shape, v.dtype) for k, v in toward.items()}
    assert all(torch.equal(plain[k], toward[k]) for k in plain if k.startswith("model.layers.0.self_attn.q_proj."))
    changed = {k.rsplit(".", 1)[0] for k in plain if not torch.equal(plain[k], toward[k])}
    assert {"model.layers.2.mlp.up_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj",
            "model.layers.2.self_attn.o_proj"} <= changed
    ids = data.tokenize(open_source(str(out)).tokenizer(), held.read_text())
    loaded = evaluate(bitsmith.load(str(out)), data.eval_windows(ids, 256), progress=False)
    assert loaded["perplexity"] == summary["eval"]["perplexity"]


@pytest.mark.parametrize("rounding", ["gptq", "gptaq"])
def test_true_sequential_stages_start_from_the_kept_attention_and_write_the_same_bytes(tmp_path, stories_path,
                                                                                      stories_split, monkeypatch,
                                                                                      rounding):
    """With --true-sequential, the attention outputs are kept at o_proj's stage and folded into the streams once
    o_proj is quantized (AttentionCache): the stages after it and the propagation run the MLP half alone, and the
    checkpoint is byte for byte the one of whole forwards every time."""
    from bitsmith.calibration.adapter import AttentionCache
    calib, _ = stories_split
    options = {**OPTIONS, "rounding": rounding, "true_sequential": True}
    calls = []
    half = BlockRunner.forward_after_residual
    monkeypatch.setattr(BlockRunner, "forward_after_residual", lambda self, *a: calls.append(1) or half(self, *a))
    bitsmith.quantize(str(stories_path), str(tmp_path / "kept"), calib=[str(calib)], progress=False, **options)
    monkeypatch.setattr(AttentionCache, "forward",
                        lambda self, runner, block, x, pos, window, keep=True: runner.forward_block(block, x, pos))
    monkeypatch.setattr(AttentionCache, "fold", lambda self, *a: None)
    bitsmith.quantize(str(stories_path), str(tmp_path / "whole"), calib=[str(calib)], progress=False, **options)
    blocks, batches = 5, 2                       # stories260K: 5 blocks; 16 windows in batches of 8
    # per block and batch: stages 3-4 and the propagation (gptq); gptaq also the unquantized stream's stages 3-4;
    # no propagation after the last block (nothing reads its outputs in a run without --eval-data)
    assert len(calls) == blocks * batches * (3 if rounding == "gptq" else 5) - batches
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


TUNED = {**OPTIONS, "tune_epochs": 2, "tune_lr": 3e-3}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, stories_path, stories_split):
    """(folder, summary) of the GPTQ run of `runs`, then tuned end to end."""
    calib, held = stories_split
    out = tmp_path_factory.mktemp("tuned") / "out"
    return out, bitsmith.quantize(str(stories_path), str(out), calib=[str(calib)], eval_data=str(held),
                                  eval_seqlen=256, progress=False, **TUNED)


def test_tuning_changes_only_the_levels_and_norms_and_lowers_the_perplexity(runs, tuned, stories_split):
    (gptq_out, gptq), (out, summary) = runs["gptq"], tuned
    plain, after = load_file(str(gptq_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in plain.items()} == {k: (v.shape, v.dtype) for k, v in after.items()}
    changed = {k for k in plain if not torch.equal(plain[k], after[k])}
    assert {k for k in changed if not k.endswith((".scales", "norm.weight"))} == set()
    assert len([k for k in changed if k.endswith(".scales")]) == 35
    assert len([k for k in changed if k.endswith("norm.weight")]) == 2 * 5 + 1
    assert torch.equal(plain["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert summary["bits_per_weight"] == gptq["bits_per_weight"]
    assert summary["eval"]["perplexity"] < 0.97 * gptq["eval"]["perplexity"]
    ids = data.tokenize(open_source(str(out)).tokenizer(), stories_split[1].read_text())
    loaded = evaluate(bitsmith.load(str(out)), data.eval_windows(ids, 256), progress=False)
    assert loaded["perplexity"] == summary["eval"]["perplexity"]
    assert verify(out) == []


def test_later_passes_on_resampled_windows_tune_another_model_that_loads(runs, tuned, tmp_path, stories_path,
                                                                          stories_split):
    """--tune-resample: the second pass reads windows with a quarter of their tokens drawn from the unquantized
    model; the model differs from the one tuned on the windows alone, still beats GPTQ's, and loads as it was."""
    calib, held = stories_split
    out = tmp_path / "resampled"
    summary = bitsmith.quantize(str(stories_path), str(out), calib=[str(calib)], eval_data=str(held),
                                eval_seqlen=256, progress=False, **{**TUNED, "tune_resample": 0.25})
    assert summary["eval"]["perplexity"] != tuned[1]["eval"]["perplexity"]
    assert summary["eval"]["perplexity"] < 0.97 * runs["gptq"][1]["eval"]["perplexity"]
    ids = data.tokenize(open_source(str(out)).tokenizer(), held.read_text())
    loaded = evaluate(bitsmith.load(str(out)), data.eval_windows(ids, 256), progress=False)
    assert loaded["perplexity"] == summary["eval"]["perplexity"]


def test_tuning_learns_every_layout_of_a_plan(tmp_path, stories_path, stories_split):
    """Lookup tables, per-input-channel grids, grids with outliers and plain grids each learn their levels (the
    tables, the scales); the outliers and every code stay; the checkpoint loads to the in-run perplexity."""
    calib, held = stories_split
    names = linear_shapes(BlockRunner(open_source(str(stories_path)).config))
    kinds = {"up_proj": {"lut": True, "group_size": -1}, "q_proj": {"per_ic": True}, "down_proj": {"outliers": 0.02}}
    plan = {name: {"bits": 3, "group_size": 32, "sym": False,
                   **next((v for k, v in kinds.items() if k in name), {})} for name in names}
    (tmp_path / "plan.json").write_text(json.dumps({"layers": plan}))
    runs = {}
    for epochs in (0, 1):
        out = tmp_path / f"e{epochs}"
        runs[epochs] = bitsmith.quantize(str(stories_path), str(out), plan=str(tmp_path / "plan.json"),
                                         calib=[str(calib)], eval_data=str(held), eval_seqlen=256, progress=False,
                                         **{**TUNED, "tune_epochs": epochs, "bits": 3})
    plain, after = (load_file(str(tmp_path / f"e{e}" / "model.safetensors")) for e in (0, 1))
    changed = {k for k in plain if not torch.equal(plain[k], after[k])}
    assert {k.rsplit(".", 1)[1] for k in changed} == {"scales", "lut", "weight"}
    assert {"model.layers.2.mlp.up_proj.lut", "model.layers.2.self_attn.q_proj.scales",
            "model.layers.2.mlp.down_proj.scales", "model.layers.2.self_attn.o_proj.scales"} <= changed
    assert runs[1]["eval"]["perplexity"] < runs[0]["eval"]["perplexity"]
    ids = data.tokenize(open_source(str(tmp_path / "e1")).tokenizer(), held.read_text())
    loaded = evaluate(bitsmith.load(str(tmp_path / "e1")), data.eval_windows(ids, 256), progress=False)
    assert loaded["perplexity"] == runs[1]["eval"]["perplexity"]


def test_a_run_killed_after_tuning_resumes_to_the_same_bytes(tmp_path, stories_path, stories_split):
    """The tuned tensors are not journaled: the resumed run tunes again, from the same start, to the same result."""
    calib = stories_split[0]
    args = ["quantize", str(stories_path), "-o", str(tmp_path / "out"), "--calib", str(calib), "--bits", "3",
            "--group-size", "32", "--nsamples", "16", "--seqlen", "128", "--tune-epochs", "2", "--tune-lr", "3e-3"]
    code = "import sys; from bitsmith.cli.main import main; main(sys.argv[1:], prog_name='bitsmith')"
    run = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, faults.VARIABLE: "commit"},
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == -9, run.stderr
    options = {k: v for k, v in TUNED.items() if k != "rounding_iters"}
    bitsmith.quantize(str(stories_path), str(tmp_path / "out"), calib=[str(calib)], progress=False, resume=True,
                      **options)
    bitsmith.quantize(str(stories_path), str(tmp_path / "whole"), calib=[str(calib)], progress=False, **options)
    for name in ("model.safetensors", "config.json", "plan.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


NOT_JOINED = (r"--tune-seqlen {}: expected a multiple of --seqlen 512 \(tuning joins whole calibration windows\), "
              "or 0 for one window a sequence")
NOT_SHARE = "--tune-resample {}: expected a share of the tokens from 0 to below 1"
NOT_GPTQ = "--tune-epochs tunes GPTQ's grids and tables on the calibration windows; --method {} is not gptq"


@pytest.mark.parametrize("options,message", [
    ({"tune_epochs": -1}, "--tune-epochs -1: expected 0 or more passes over the calibration windows"),
    ({"tune_epochs": 1, "tune_lr": 0.0}, "--tune-lr 0.0: expected a small positive learning rate such as 0.001"),
    ({"tune_epochs": 1, "tune_batch": 0}, "--tune-batch 0: expected 1 or more windows per tuning step"),
    *(({"tune_epochs": 1, "seqlen": 512, "tune_seqlen": n}, NOT_JOINED.format(n)) for n in (1000, -512)),
    ({"tune_epochs": 1, "seqlen": 512, "nsamples": 6, "tune_seqlen": 2048},
     "--tune-seqlen 2048 joins 4 calibration windows a sequence; --nsamples 6 is not a multiple of it"),
    *(({"tune_epochs": 1, "method": method}, NOT_GPTQ.format(method)) for method in ("rtn", "qoq")),
    *(({"tune_epochs": 2, "tune_resample": share}, NOT_SHARE.format(share)) for share in (1.0, -0.1)),
    ({"tune_epochs": 1, "tune_self": -1}, "--tune-self -1: expected 0 or more windows sampled for tuning"),
    ({"tune_self": 8}, "--tune-self 8 samples windows for --tune-epochs, which is 0"),
    ({"tune_epochs": 1, "seqlen": 512, "nsamples": 8, "tune_seqlen": 2048, "tune_self": 6},
     "--tune-seqlen 2048 joins 4 windows a sequence; --tune-self 6 is not a multiple of it"),
])
def test_bad_tuning_options_are_refused(options, message):
    with pytest.raises(InputError, match="^" + message + "$"):
        QuantizeOptions(**options).validate()


def test_a_measured_plan_reports_the_loss_of_the_tuned_model(tmp_path, stories_path, stories_split):
    """The measured loss increase on the first Fisher windows (3 here: not a whole number of batches) is the tuned
    model's, lower than the same plan's untuned one."""
    calib = stories_split[0]
    options = {**TUNED, "tune_epochs": 1, "fisher_samples": 3}
    tuned = bitsmith.quantize(str(stories_path), str(tmp_path / "tuned"), calib=[str(calib)], target_bpw=3.5,
                              progress=False, **options)
    plain = bitsmith.quantize(str(stories_path), str(tmp_path / "plain"), calib=[str(calib)], target_bpw=3.5,
                              measurement=str(tmp_path / "tuned" / "measurement.json"), progress=False,
                              **{**options, "tune_epochs": 0})
    assert tuned["measured_error"]["windows"] == plain["measured_error"]["windows"] == 3
    assert tuned["measured_error"]["base_nll"] == plain["measured_error"]["base_nll"]
    assert 0 < tuned["measured_error"]["nats_per_token"] < plain["measured_error"]["nats_per_token"]


def test_recomputing_the_blocks_in_the_backward_pass_writes_the_same_bytes(tmp_path, stories_path, stories_split,
                                                                            monkeypatch):
    """Tuning keeps the activations of as many blocks as memory holds (quantize/tune.py `kept_blocks`) and
    recomputes the others' in its backward pass: the same gradients, so the same checkpoint whether none, one or
    all of the blocks keep theirs."""
    from bitsmith import pipeline
    calib = stories_split[0]
    asked = []
    for kept in ("none", "one", "all"):
        def keep(per_block, blocks, free, kept=kept):
            asked.append((per_block, blocks, free))
            return {"none": 0, "one": 1, "all": blocks}[kept]
        monkeypatch.setattr(pipeline, "kept_blocks", keep)
        bitsmith.quantize(str(stories_path), str(tmp_path / kept), calib=[str(calib)], progress=False, **TUNED)
    assert all(per_block > 0 and blocks > 1 and free > 0 for per_block, blocks, free in asked)
    written = {kept: (tmp_path / kept / "model.safetensors").read_bytes() for kept in ("none", "one", "all")}
    assert written["none"] == written["one"] == written["all"]


def test_tune_batch_sets_the_windows_of_each_tuning_step(tmp_path, stories_path, stories_split, monkeypatch):
    """--tune-batch 4 over 16 windows and 2 passes: 8 Adam steps of 4 windows each (the calibration forwards keep
    their own batch)."""
    from bitsmith import pipeline
    traces = []

    def recorded(*args, **kwargs):
        traces.append((kwargs["batch"], pipeline_tune(*args, **kwargs)))
        return traces[-1][1]
    pipeline_tune = pipeline.tune
    monkeypatch.setattr(pipeline, "tune", recorded)
    bitsmith.quantize(str(stories_path), str(tmp_path / "out"), calib=[str(stories_split[0])], progress=False,
                      **{**TUNED, "tune_batch": 4})
    [(batch, trace)] = traces
    assert batch == 4 and len(trace.losses) == 2 * 16 // 4


def recorded_tuning(monkeypatch) -> list:
    """The calls of pipeline.tune from here on, each (sequences, targets, trace), while it runs as it does."""
    calls, tune = [], pipeline.tune

    def recorded(*args, **kwargs):
        calls.append((args[3], args[4], tune(*args, **kwargs)))
        return calls[-1][2]
    monkeypatch.setattr(pipeline, "tune", recorded)
    return calls


def test_tune_self_adds_the_models_samples_to_tuning_alone(tmp_path, stories_path, stories_split, monkeypatch):
    """--tune-self 4 beside 16 windows of the file: the calibration (and so the statistics of GPTQ and the
    measurement) is the file's alone, as without it; tuning reads the 16 and 4 windows the model samples (the draws
    `--calib self` makes first), toward the unquantized model's states of them: 2 passes of 2 a step, 20 steps."""
    calls = recorded_tuning(monkeypatch)
    calib = [str(stories_split[0])]
    bitsmith.quantize(str(stories_path), str(tmp_path / "out"), calib=calib, progress=False,
                      **{**TUNED, "tune_self": 4})
    [(sequences, teacher, trace)] = calls
    source = open_source(str(stories_path))
    runner = BlockRunner(source.config, "cpu")
    plain, with_self, own = (QuantizeOptions(**{**TUNED, "calib": c, "tune_self": n, "nsamples": k})
                             for c, n, k in ((calib, 0, 16), (calib, 4, 16), (["self"], 0, 4)))
    for opts in (plain, with_self, own):
        opts.validate()
    drawn = pipeline.calibration(source, with_self, progress=False)
    windows, tuning = drawn.windows, drawn.tuning
    assert torch.equal(windows, pipeline.calibration(source, plain, progress=False).windows)
    assert torch.equal(tuning, pipeline.calibration(source, own, progress=False).windows)
    assert torch.equal(sequences, torch.cat([windows, tuning])) and len(trace.losses) == 2 * 20 // 2
    torch.testing.assert_close(teacher[16:], pipeline.unquantized_last_states(runner, source, tuning, with_self))
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["options"]["tune_self"] == 4


def test_tune_self_draws_after_the_calibrations_own_samples(stories_path):
    """With --calib self too, the calibration's samples are those it has without --tune-self, and tuning's are
    further draws: none of them twice."""
    source = open_source(str(stories_path))
    both, alone = (QuantizeOptions(**{**TUNED, "calib": ["self"], "nsamples": 4, "tune_self": t}) for t in (2, 0))
    for opts in (both, alone):
        opts.validate()
    calib = pipeline.calibration(source, both, progress=False)
    assert torch.equal(calib.windows, pipeline.calibration(source, alone, progress=False).windows)
    assert calib.tuning.shape == (2, OPTIONS["seqlen"])
    assert not (calib.tuning[:, None] == calib.windows[None]).all(-1).any()
    assert "tuning also reads 2 x 128 tokens sampled from the model" in calib.description


def test_tune_self_samples_whole_texts_of_the_tuning_length(stories_path):
    """With --tune-seqlen 4 x --seqlen, tuning's 8 windows are 2 texts of 512 tokens sampled whole, cut into
    consecutive windows (which tuning joins again), not 8 texts of 128 each from a first token of their own."""
    source = open_source(str(stories_path))
    seqlen = OPTIONS["seqlen"]
    opts = QuantizeOptions(**{**TUNED, "calib": ["self"], "nsamples": 4, "tune_self": 8, "tune_seqlen": 4 * seqlen})
    opts.validate()
    calib = pipeline.calibration(source, opts, progress=False)
    tuning = calib.tuning
    assert "tuning also reads 8 x 128 tokens sampled from the model (texts of 512)" in calib.description
    from bitsmith.loader import load_model
    model = load_model(source, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(opts.seed)
    data.self_windows(model, 4, seqlen, generator, model.config.vocab_size)      # the calibration's draws first
    texts = data.self_windows(model, 2, 4 * seqlen, generator, model.config.vocab_size)
    assert torch.equal(pipeline.joined(tuning, 4 * seqlen), texts)


def test_joined_windows_follow_each_other_in_order():
    windows = torch.arange(6 * 4).reshape(6, 4)
    assert torch.equal(pipeline.joined(windows, 12), torch.tensor([list(range(12)), list(range(12, 24))]))
    assert torch.equal(pipeline.joined(windows, 4), windows)


def test_the_targets_of_joined_windows_begin_as_the_first_windows_own(stories_path, stories_split):
    """Attention is causal, so the first `seqlen` positions of a joined sequence are its first window alone: the
    unquantized model's states there are the calibration stream's of that window (made in other batches)."""
    source = open_source(str(stories_path))
    opts = QuantizeOptions(**{**OPTIONS, "calib": [str(stories_split[0])], "calib_dtype": "float32"})
    opts.validate()
    windows = pipeline.calibration(source, opts, progress=False).windows
    runner = BlockRunner(source.config, "cpu")
    alone = pipeline.unquantized_last_states(runner, source, windows, opts)
    joined = pipeline.unquantized_last_states(runner, source, pipeline.joined(windows, 4 * opts.seqlen), opts)
    assert joined.shape == (4, 4 * opts.seqlen, alone.shape[-1])
    torch.testing.assert_close(joined[:, :opts.seqlen], alone[::4], rtol=1e-5, atol=1e-5)
    later = joined[:, opts.seqlen:2 * opts.seqlen] - alone[1::4]     # the second window sees the first: not alone
    assert later.abs().amax() > 1e-2


def test_tune_seqlen_tunes_on_joined_windows(tmp_path, stories_path, stories_split, monkeypatch):
    """--tune-seqlen 4 x --seqlen over 16 windows: 4 sequences of 512 tokens, each its windows in order, and
    the unquantized model's states of them as targets; 2 passes of 2 sequences a step are 4 Adam steps."""
    calls = recorded_tuning(monkeypatch)
    options = {**TUNED, "tune_seqlen": 4 * OPTIONS["seqlen"]}
    bitsmith.quantize(str(stories_path), str(tmp_path / "out"), calib=[str(stories_split[0])], progress=False,
                      **options)
    [(sequences, teacher, trace)] = calls
    source = open_source(str(stories_path))
    opts = QuantizeOptions(**{**options, "calib": [str(stories_split[0])]})
    opts.validate()
    windows = pipeline.calibration(source, opts, progress=False).windows
    assert torch.equal(sequences, windows.reshape(4, 4 * OPTIONS["seqlen"]))
    assert teacher.shape[:2] == sequences.shape and len(trace.losses) == 2 * 4 // 2
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["options"]["tune_seqlen"] == 512
