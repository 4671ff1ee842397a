from types import SimpleNamespace

import pytest
import torch
from tests_support import needs_smollm2

from bitsmith.calibration import data
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source


@needs_smollm2
def test_windows_follow_gptq_sampler_on_c4(text_dir):
    # GPTQ datautils: random.seed(0), start = randint(0, n - seqlen - 1); the reference run drew
    # 55340, 25247, 49673, 27562 first from the 56,346 tokens of c4_calib.txt (research/baselines.md)
    ids = data.tokenize(open_source("smollm2-135m").tokenizer(), data.read_text([str(text_dir / "c4_calib.txt")]))
    assert ids.numel() == 56346
    windows = data.random_windows(ids, 128, 512, seed=0)
    assert windows.shape == (128, 512)
    for row, start in enumerate([55340, 25247, 49673, 27562]):
        assert torch.equal(windows[row], ids[start:start + 512])


def test_eval_windows_drop_the_remainder():
    w = data.eval_windows(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert data.eval_windows(torch.arange(10), 4, max_tokens=5).tolist() == [[0, 1, 2, 3]]


def test_too_little_text_is_a_clear_error():
    with pytest.raises(InputError, match="fewer than --seqlen 512"):
        data.random_windows(torch.arange(100), 4, 512, 0)


def test_empty_file_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        data.read_text([str(empty)])


def test_text_with_a_few_control_characters_and_any_script_is_read(tmp_path):
    text = "Il était une fois\tun chat.\f\n" + "Жил-был кот 🐈\x0b\n" * 20 + "\x00\x07"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert data.read_text([str(tmp_path / "t.txt")]) == text


@pytest.mark.parametrize("seqlen, context, expected", [(None, 512, 512), (None, 4096, 2048), (None, None, 2048),
                                                       (128, 512, 128), (512, 512, 512)])
def test_eval_seqlen_defaults_to_a_shorter_context(seqlen, context, expected):
    assert data.eval_seqlen(seqlen, context) == expected


def test_sampling_batch_keeps_the_key_value_cache_within_its_budget():
    smollm2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    per_window = 30 * 2 * 512 * 3 * 64 * 4                                 # 23.6 MB at 512 tokens
    assert data.sampling_batch(smollm2, 512, budget=10 * per_window) == 10
    assert data.sampling_batch(smollm2, 512, budget=10 * per_window - 1) == 9
    assert data.sampling_batch(smollm2, 512) == data.SAMPLING_BATCH                   # 1.5 GB within 2 GiB
    assert data.sampling_batch(smollm2, 2048) == 22                              # 94 MB a window
    llama7b = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                              hidden_size=4096, head_dim=None)             # 2.1 GB a window at 2048
    assert data.sampling_batch(llama7b, 2048) == 1


def test_categorical_draws_follow_each_rows_distribution():
    """Rows of known distributions (zeros among them, one row a single certain entry): the draws' frequencies match
    each row within 5 standard errors, a zero-probability entry is never drawn, the same seed draws the same."""
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(6, 40, generator=g) ** 3
    probs[:, ::3] = 0
    probs[5] = 0
    probs[5, 17] = 1
    probs = probs / probs.sum(1, keepdim=True)
    n = 20_000
    draws = torch.stack([data.categorical(probs, g) for _ in range(n)], dim=1)             # [6, n]
    assert draws.dtype == torch.int64 and draws.shape == (6, n)
    counts = torch.stack([torch.bincount(row, minlength=40) for row in draws]).double() / n
    stderr = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((counts - probs.double()).abs() <= 5 * stderr + 1e-12).all()
    assert (counts[probs == 0] == 0).all()
    assert (draws[5] == 17).all()
    assert torch.equal(data.categorical(probs, torch.Generator().manual_seed(3)),
                       data.categorical(probs, torch.Generator().manual_seed(3)))


def test_the_filled_cache_samples_what_the_growing_cache_samples(stories_path):
    """Sampling with the key/value cache filled in place (`filled_cache`) draws the very tokens that transformers'
    own cache, concatenated at every step, draws from the same generator; a window past its length is refused, and a
    reset cache fills again from its start."""
    import bitsmith
    model = bitsmith.load(str(stories_path))
    vocab, gen = model.config.vocab_size, torch.Generator().manual_seed(5)
    step = ids = torch.randint(0, vocab, (3, 1), generator=gen)
    past, cache = None, data.cache_arg()
    with torch.no_grad():
        for _ in range(39):
            out = model(input_ids=step, use_cache=True, **{cache: past})
            past = getattr(out, cache)
            step = data.categorical(torch.softmax(out.logits[:, -1].float(), dim=-1), gen)[:, None]
            ids = torch.cat([ids, step], dim=1)
    assert type(past).__name__ == "DynamicCache"
    assert torch.equal(data.self_windows(model, 3, 40, 5, vocab, batch=3), ids)
    full = data.filled_cache(model.config.num_hidden_layers, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="a cache of 2 positions cannot take position 3"):
        model(input_ids=ids[:, :3], use_cache=True, **{cache: full})
    reused = data.filled_cache(model.config.num_hidden_layers, 3)
    with torch.no_grad():
        first = model(input_ids=ids[:, :3], use_cache=True, **{cache: reused}).logits
        reused.reset()
        assert reused.get_seq_length() == 0
        assert torch.equal(model(input_ids=ids[:, :3], use_cache=True, **{cache: reused}).logits, first)
