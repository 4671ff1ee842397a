"""Folders from someone else: names that lead out of the folder, sizes that do not match the stored data and
values of the wrong JSON type are refused with one line and exit 2, before anything is written or allocated."""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bf16_cases import same_bits
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bitsmith.cli.main import main
from bitsmith.formats import dfloat
from bitsmith.formats.checkpoint import DTYPE_BYTES, MANIFEST, Checkpoint
from bitsmith.formats.dfloat import originals
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source

ADVICE = "copy the folder with its links resolved to use it"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def model_folder(folder: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": (torch.randn(300, 64, generator=g) * 0.02).to(torch.bfloat16),
               "norm.weight": (1 + torch.randn(64, generator=g) * 0.1).to(torch.bfloat16),
               "ids": torch.arange(10)}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    (folder / "tokenizer.json").write_text("{}")
    return tensors


@pytest.fixture
def z(tmp_path):
    """A compressed folder beside a file someone would like to read or overwrite."""
    model_folder(tmp_path / "model")
    dfloat.compress_checkpoint(tmp_path / "model", tmp_path / "z", window_bits=64)
    (tmp_path / "secret.txt").write_text("not for the output")
    return tmp_path / "z"


def edit(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def one_line(r, expected: str) -> None:
    assert r.output.splitlines() == [expected], r.output


# names that lead out of the folder


@pytest.mark.parametrize("key, name, problem", [
    ("texts", "../x", "climbs out of the folder (a '..' part)"),
    ("texts", "a/../../b", "climbs out of the folder (a '..' part)"),
    ("texts", "{tmp}/victim.txt", "is an absolute path (names are relative to the folder)"),
    ("files", "../evil.safetensors", "climbs out of the folder (a '..' part)"),
    ("files", "{tmp}/evil.safetensors", "is an absolute path (names are relative to the folder)"),
    ("files", "sub\\..\\..\\evil.safetensors", "holds a backslash (names are POSIX paths)"),
    ("texts", "con\0fig.json", "holds a control character"),
])
def test_decompress_refuses_source_files_named_outside_and_writes_nothing(z, tmp_path, key, name, problem):
    name = name.format(tmp=tmp_path)

    def rename(m):
        entries = m["source_files"][key]
        entries[name] = entries.pop("config.json" if key == "texts" else "model.safetensors")
    edit(z, rename)
    before = files_under(tmp_path)
    r = run("decompress", z, "-o", tmp_path / "d")
    assert r.exit_code == 2
    one_line(r, f"error: {z / MANIFEST}: source_files {key}: {name!r} {problem}")
    assert files_under(tmp_path) == before
    r = run("verify", z)                                   # a folder decompress refuses is not OK either
    assert r.exit_code == 2
    one_line(r, f"FAIL {z / MANIFEST}: source_files {key}: {name!r} {problem}")


@pytest.mark.parametrize("key, name, message", [
    ("texts", "tokenizer.json", ("source_files text 'tokenizer.json': not one of config.json, "
                                "model.safetensors.index.json")),
    ("files", "sub/model.safetensors", ("source_files shard 'sub/model.safetensors': not a .safetensors file "
                                       "at the top of the folder")),
    ("files", "config.json", "source_files shard 'config.json': not a .safetensors file at the top of the folder"),
])
def test_decompress_refuses_source_files_it_never_records(z, tmp_path, key, name, message):
    def rename(m):
        entries = m["source_files"][key]
        entries[name] = entries.pop("config.json" if key == "texts" else "model.safetensors")
    edit(z, rename)
    r = run("decompress", z, "-o", tmp_path / "d")
    assert r.exit_code == 2
    one_line(r, f"error: {z / MANIFEST}: {message}")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d*"))


@pytest.mark.parametrize("name, problem", [
    ("../secret.txt", "climbs out of the folder (a '..' part)"),
    ("{tmp}/secret.txt", "is an absolute path (names are relative to the folder)"),
])
def test_verify_fails_a_manifest_naming_files_outside(z, tmp_path, name, problem):
    name = name.format(tmp=tmp_path)
    digest = dfloat.codec.bytes_sha256(Path(tmp_path / "secret.txt").read_bytes())
    edit(z, lambda m: m["files"].update({name: digest}))
    r = run("verify", z)
    assert r.exit_code == 2
    one_line(r, f"FAIL {z / MANIFEST} files: {name!r} {problem}")


def test_verify_fails_a_shard_the_manifest_leaves_out(z):
    save_file({"extra.weight": torch.ones(3)}, str(z / "extra.safetensors"))
    r = run("verify", z)
    assert r.exit_code == 2
    one_line(r, "FAIL extra.safetensors: not in the manifest")


def test_verify_fails_a_manifest_without_a_files_map(z):
    edit(z, lambda m: m.update(files=["model.safetensors"]))
    r = run("verify", z)
    assert r.exit_code == 2
    one_line(r, f"FAIL {z / MANIFEST}: no files map (names to sha256)")


def test_a_side_file_linked_out_of_the_folder_is_refused_everywhere(z, tmp_path):
    (z / "tokenizer.json").unlink()
    (z / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    target = (tmp_path / "secret.txt").resolve()
    before = files_under(tmp_path)
    r = run("decompress", z, "-o", tmp_path / "d")
    assert r.exit_code == 2
    one_line(r, f"error: {z}: 'tokenizer.json' is a symbolic link out of the folder (to {target}); {ADVICE}")
    r = run("verify", z)
    assert r.exit_code == 2
    one_line(r, f"FAIL {z / MANIFEST} files: 'tokenizer.json' is a symbolic link out of the folder (to {target}); "
                f"{ADVICE}")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("link", ["model.safetensors", "tokenizer.json", "extra/vocab.txt"])
def test_compress_and_quantize_refuse_a_model_folder_with_a_link_out(tmp_path, link):
    model_folder(tmp_path / "model")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tmp_path / "model" / "model.safetensors", outside / "file")
    (tmp_path / "model" / link).unlink(missing_ok=True)
    (tmp_path / "model" / link).parent.mkdir(exist_ok=True)
    (tmp_path / "model" / link).symlink_to(outside / "file")
    target = (outside / "file").resolve()
    message = f"{tmp_path / 'model'}: '{link}' is a symbolic link out of the folder (to {target}); "
    before = files_under(tmp_path)
    r = run("compress", tmp_path / "model", "-o", tmp_path / "z")
    assert r.exit_code == 2
    one_line(r, f"error: {message}{ADVICE}")
    assert files_under(tmp_path) == before
    with pytest.raises(InputError) as e:
        open_source(str(tmp_path / "model"))                  # what quantize and load read the folder with
    assert str(e.value) == message + ADVICE


def sharded(folder: Path, weight_map: dict) -> None:
    folder.mkdir()
    save_file({"a.weight": torch.ones(4, 4, dtype=torch.bfloat16)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shard, problem", [
    ("../elsewhere/model-00001-of-00001.safetensors", ("'../elsewhere/model-00001-of-00001.safetensors' climbs "
                                                      "out of the folder (a '..' part)")),
    ("/etc/hostname", "'/etc/hostname' is an absolute path (names are relative to the folder)"),
    (["model-00001-of-00001.safetensors"], "['model-00001-of-00001.safetensors'] is not a file name"),
])
def test_shard_index_names_outside_the_folder_are_refused(tmp_path, shard, problem):
    sharded(tmp_path / "model", {"a.weight": shard})
    index = tmp_path / "model" / "model.safetensors.index.json"
    r = run("compress", tmp_path / "model", "-o", tmp_path / "z")
    assert r.exit_code == 2
    one_line(r, f"error: {index} weight_map: {problem}")
    assert not (tmp_path / "z").exists()


def test_shard_index_naming_a_missing_shard_is_refused(tmp_path):
    sharded(tmp_path / "model", {"a.weight": "model-00002-of-00002.safetensors"})
    index = tmp_path / "model" / "model.safetensors.index.json"
    with pytest.raises(InputError) as e:
        Checkpoint(tmp_path / "model")
    assert str(e.value) == (f"{index}: weight_map names model-00002-of-00002.safetensors, which is not a file in "
                            "the folder")


# sizes and types in the lossless block


def set_meta(field, value):
    def change(m):
        m["lossless"]["tensors"]["embed.weight"][field] = value
    return change


def drop_meta(field):
    def change(m):
        del m["lossless"]["tensors"]["embed.weight"][field]
    return change


HUGE_CASES = [
    (set_meta("window_bits", 2**40), ("embed.weight: lossless metadata window_bits = 1099511627776 is invalid "
                                     "(a multiple of 32 from 32 to 16384)")),
    (set_meta("window_bits", 16384 + 32), ("embed.weight: lossless metadata window_bits = 16416 is invalid "
                                          "(a multiple of 32 from 32 to 16384)")),
    (set_meta("shape", [2**20, 2**20]), ("embed.weight.__df11: stored as U8 [{stored}], its metadata needs U8 "
                                        "[{needs}] (corrupted coded tensor)")),
    (set_meta("stream_bits", 2**50), ("embed.weight.__df11: stored as U8 [{stored}], its metadata needs U8 "
                                     "[{needs}] (corrupted coded tensor)")),
    (set_meta("exponent_range", [0, 255]), ("embed.weight.__df11: stored as U8 [{stored}], its metadata needs U8 "
                                           "[{needs}] (corrupted coded tensor)")),
    (set_meta("shape", [0, 2**70]), ("embed.weight: lossless metadata shape = [0, 1180591620717411303424] is invalid "
                                    "(a list of non-negative integers, an int64 numel)")),
    (set_meta("shape", [-300, -64]), ("embed.weight: lossless metadata shape = [-300, -64] is invalid "
                                     "(a list of non-negative integers, an int64 numel)")),
]
TYPE_CASES = [
    (set_meta("window_bits", "2048"), ("embed.weight: lossless metadata window_bits = '2048' is invalid "
                                      "(a multiple of 32 from 32 to 16384)")),
    (set_meta("window_bits", True), ("embed.weight: lossless metadata window_bits = True is invalid "
                                    "(a multiple of 32 from 32 to 16384)")),
    (set_meta("shape", "300x64"), ("embed.weight: lossless metadata shape = '300x64' is invalid "
                                  "(a list of non-negative integers, an int64 numel)")),
    (set_meta("shape", [300.0, 64]), ("embed.weight: lossless metadata shape = [300.0, 64] is invalid "
                                     "(a list of non-negative integers, an int64 numel)")),
    (set_meta("stream_bits", None), ("embed.weight: lossless metadata stream_bits = None is invalid "
                                    "(a non-negative integer)")),
    (set_meta("exponent_range", {"first": 0}), ("embed.weight: lossless metadata exponent_range = {'first': 0} is "
                                               "invalid ([first, last] exponents, 0 <= first <= last + 1 <= 256)")),
    (set_meta("exponent_range", [200, 100]), ("embed.weight: lossless metadata exponent_range = [200, 100] is "
                                             "invalid ([first, last] exponents, 0 <= first <= last + 1 <= 256)")),
    (set_meta("sha256", 5), "embed.weight: lossless metadata sha256 = 5 is invalid (64 lowercase hex digits)"),
    (set_meta("dtype", "float32"), "embed.weight: lossless metadata dtype = 'float32' is invalid (bfloat16)"),
    (drop_meta("stream_bits"), "embed.weight: incomplete lossless metadata (no stream_bits)"),
    (lambda m: m["lossless"]["tensors"].update({"embed.weight": [300, 64]}),
     "embed.weight: lossless metadata is list, not an object"),
    (lambda m: m["lossless"].update(tensors=["embed.weight"]),
     "manifest lossless tensors is list, not an object of names"),
    (lambda m: m.update(lossless="df11-huffman"), "manifest lossless block is str, not an object"),
    (lambda m: m["lossless"]["tensors"].update({"ghost.weight": m["lossless"]["tensors"]["norm.weight"]}),
     "ghost.weight: coded tensor without its stored part ghost.weight.__df11"),
]


def expected_message(z: Path, message: str, change) -> str:
    """The message with the stored and the needed part size of embed.weight filled in."""
    if "{needs}" not in message:
        return message
    manifest = json.loads((z / MANIFEST).read_text())
    stored = dfloat.part_size(manifest["lossless"]["tensors"]["embed.weight"])
    change(manifest)
    return message.format(stored=stored, needs=dfloat.part_size(manifest["lossless"]["tensors"]["embed.weight"]))


@pytest.mark.parametrize("change, message", HUGE_CASES + TYPE_CASES)
def test_lossless_metadata_is_checked_before_any_decoding(monkeypatch, z, tmp_path, change, message):
    message = expected_message(z, message, change)
    edit(z, change)
    monkeypatch.setattr(dfloat, "decode_many", lambda *a, **kw: pytest.fail("decoded unchecked metadata"))
    with pytest.raises(InputError) as e:
        Checkpoint(z)
    assert str(e.value) == message
    before = files_under(tmp_path)
    r = run("decompress", z, "-o", tmp_path / "d")
    assert r.exit_code == 2
    one_line(r, f"error: {message}")
    r = run("verify", z)
    assert r.exit_code == 2
    one_line(r, f"FAIL {message}")
    assert files_under(tmp_path) == before


def test_compress_refuses_windows_the_decoder_would_not_read(tmp_path):
    model_folder(tmp_path / "model")
    r = run("compress", tmp_path / "model", "-o", tmp_path / "z", "--window-bits", str(2**15))
    assert r.exit_code == 2
    one_line(r, "error: window_bits must be a multiple of 32 from 32 to 16384, got 32768")
    assert not (tmp_path / "z").exists()


CAPPED = """
import resource, sys
import bitsmith.formats.checkpoint
from bitsmith.cli.main import main
with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
for args in (["decompress", sys.argv[1], "-o", sys.argv[2]], ["verify", sys.argv[1]]):
    try:
        main(args)
    except SystemExit as e:
        print(e.code)
"""


@pytest.mark.parametrize("change, message", [HUGE_CASES[0], HUGE_CASES[2]])
def test_huge_sizes_fail_fast_within_a_memory_cap(z, tmp_path, change, message):
    """In a process that may allocate 1 GiB more than it holds once the modules are loaded."""
    message = expected_message(z, message, change)
    edit(z, change)
    r = subprocess.run([sys.executable, "-c", CAPPED, str(z), str(tmp_path / "d")], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.stdout.split() == ["2", "2"], r.stderr
    assert r.stderr.splitlines() == [f"error: {message}", f"FAIL {message}"]
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(source_files=["model.safetensors"]),
     "source_files files: not an object of names to dict values"),
    (lambda m: m["source_files"].update(texts={"config.json": 5}),
     "source_files texts: not an object of names to str values"),
    (lambda m: m["source_files"]["files"]["model.safetensors"].update(header=5),
     "source_files shard 'model.safetensors': needs a header and a sha256, both strings"),
    (lambda m: m["source_files"]["files"]["model.safetensors"].update(header="{not json"),
     ("source_files shard 'model.safetensors': recorded header is not valid JSON (Expecting property name enclosed "
     "in double quotes: line 1 column 2 (char 1))")),
    (lambda m: m["source_files"]["files"]["model.safetensors"].update(header="[1, 2]"),
     "source_files shard 'model.safetensors': recorded header is list, not an object"),
    (lambda m: m["source_files"]["texts"].update({"config.json": "\ud800"}),
     "source_files text 'config.json': holds text that no bytes encode (a lone surrogate)"),
])
def test_decompress_refuses_malformed_source_files(z, tmp_path, change, message):
    edit(z, change)
    r = run("decompress", z, "-o", tmp_path / "d")
    assert r.exit_code == 2
    one_line(r, f"error: {z / MANIFEST}: {message}")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d*"))


def header_edit(field, value, tensor="ids"):
    def change(m):
        shard = m["source_files"]["files"]["model.safetensors"]
        header = json.loads(shard["header"])
        header[tensor][field] = value
        shard["header"] = json.dumps(header)
    return change


@pytest.mark.parametrize("change, message", [
    (header_edit("dtype", "F8_E4M3"), "tensor 'ids' has dtype 'F8_E4M3', not one of " + ", ".join(DTYPE_BYTES)),
    (header_edit("dtype", ["I64"]), "tensor 'ids' has dtype ['I64'], not one of " + ", ".join(DTYPE_BYTES)),
    (header_edit("shape", [-10]), "tensor 'ids' has shape [-10], not a list of non-negative integers"),
    (header_edit("shape", [2**40]), ("tensor 'ids' has data_offsets [0, 80], expected [0, 8796093022208] for I64 "
                                    "[1099511627776]")),
    (header_edit("data_offsets", [0, 2**60]), ("tensor 'ids' has data_offsets [0, 1152921504606846976], expected "
                                              "[0, 80] for I64 [10]")),
    (header_edit("data_offsets", "0-80"), "tensor 'ids' has data_offsets '0-80', not two non-negative integers"),
])
def test_decompress_refuses_recorded_headers_that_do_not_describe_a_file(z, tmp_path, change, message):
    manifest = json.loads((z / MANIFEST).read_text())
    header = json.loads(manifest["source_files"]["files"]["model.safetensors"]["header"])
    first = min(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else 2**64)[0]
    assert first == "ids"                      # the tensor whose offsets start at 0 (so the messages above hold)
    edit(z, change)
    r = run("decompress", z, "-o", tmp_path / "d")
    assert r.exit_code == 2
    one_line(r, f"error: {z / MANIFEST}: source_files shard 'model.safetensors': {message}")
    assert not (tmp_path / "d").exists()


def test_decompress_refuses_recorded_tensors_the_folder_does_not_hold(z, tmp_path):
    def rename(m):
        shard = m["source_files"]["files"]["model.safetensors"]
        header = json.loads(shard["header"])
        header["other"] = header.pop("ids")
        shard["header"] = json.dumps(header)
    edit(z, rename)
    r = run("decompress", z, "-o", tmp_path / "d")
    assert r.exit_code == 2
    one_line(r, f"error: {z / MANIFEST}: source_files: tensor ids recorded as absent, stored as I64 [10]")
    assert not (tmp_path / "d").exists()


# fuzzing: nothing but InputError, whatever the manifest says


def json_values():
    leaves = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                             inner, max_size=3),
                        max_leaves=8)


FIELDS = ["dtype", "shape", "window_bits", "stream_bits", "exponent_range", "sha256"]
DROP = object()


def plausible():
    """Integers and lists of integers around the sizes a real entry holds, and far beyond them."""
    ints = st.integers(-2, 2**64) | st.integers(-64, 20_000) | st.sampled_from([32, 64, 2048, 16384, 16416])
    return ints | st.lists(ints, max_size=3)


def metadata_edits():
    """field -> new value (DROP: the field removed), for one to three fields."""
    return st.dictionaries(st.sampled_from(FIELDS), st.just(DROP) | json_values() | plausible(), min_size=1,
                           max_size=3)


@pytest.fixture
def folder_to_fuzz(tmp_path):
    tensors = model_folder(tmp_path / "model")
    dfloat.compress_checkpoint(tmp_path / "model", tmp_path / "z", window_bits=64)
    return tmp_path / "z", (tmp_path / "z" / MANIFEST).read_text(), tensors


@pytest.fixture
def memory_cap():
    """Any allocation beyond 2 GiB more than the process holds fails at once instead of swapping."""
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + (2 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metadata_edits(), st.sampled_from(["embed.weight", "norm.weight"]))
def test_fuzzed_lossless_metadata_reads_back_exactly_or_fails_with_input_error(folder_to_fuzz, memory_cap, edits,
                                                                                   name):
    z, original, tensors = folder_to_fuzz
    manifest = json.loads(original)
    meta = manifest["lossless"]["tensors"][name]
    for field, value in edits.items():
        if value is DROP:
            del meta[field]
        else:
            meta[field] = value
    (z / MANIFEST).write_text(json.dumps(manifest))
    try:
        checkpoint = Checkpoint(z)
        got = dict(checkpoint.get_many(checkpoint.keys()))
    except InputError as e:
        assert "\n" not in str(e)
        return
    finally:
        (z / MANIFEST).write_text(original)
    # the bytes come back exactly (the sha256 is of the bytes: an edited shape of the same size reshapes them)
    assert torch.equal(got["ids"], tensors["ids"])
    assert all(same_bits(got[k].reshape(-1), tensors[k].reshape(-1)) for k in ("embed.weight", "norm.weight"))


@settings(max_examples=200, deadline=None)
@given(json_values(), json_values())
def test_fuzzed_lossless_block_and_config_fail_only_with_input_error(block, qc):
    try:
        coded = dfloat.coded_tensors({"lossless": block}, {"quantization_config": qc})
    except InputError:
        return
    for name, meta in coded.items():
        dfloat.check_metadata(name, meta)


def header_entries():
    dtypes = st.sampled_from([*DTYPE_BYTES, "F8_E4M3", "bf16"]) | json_values()
    shapes = st.lists(st.integers(-1, 6), max_size=3) | json_values()
    offsets = st.lists(st.integers(-1, 200), min_size=2, max_size=2) | json_values()
    entry = st.fixed_dictionaries({}, optional={"dtype": dtypes, "shape": shapes, "data_offsets": offsets})
    return st.dictionaries(st.text(max_size=4), entry | json_values(), max_size=4)


def tidy_headers():
    """Headers that lay their tensors out back to back, some of them then edited."""
    def laid_out(specs):
        header, end = {}, 0
        for i, (dtype, shape) in enumerate(specs):
            size = DTYPE_BYTES[dtype]
            for d in shape:
                size *= d
            header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + size]}
            end += size
        return header
    return st.lists(st.tuples(st.sampled_from(list(DTYPE_BYTES)), st.lists(st.integers(0, 5), max_size=3)),
                    max_size=4).map(laid_out)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    json_values(),
    st.builds(lambda name, header: {"files": {name: {"header": header, "sha256": "0" * 64}}, "texts": {}},
              st.sampled_from(["model.safetensors", "../model.safetensors", "/model.safetensors", "x"]),
              st.one_of(st.text(max_size=40), st.binary(max_size=40).map(originals.as_text),
                        st.builds(json.dumps, header_entries()), st.builds(json.dumps, tidy_headers())))))
def test_fuzzed_recorded_headers_parse_or_fail_with_input_error(source_files):
    try:
        tensors, files = originals.layout(source_files)
    except InputError as e:
        assert "\n" not in str(e)
        return
    for name, (head, order) in files.items():
        header = json.loads(head[8:])
        assert int.from_bytes(head[:8], "little") == len(head) - 8 and name.endswith(".safetensors")
        end = 0
        for tensor in order:
            begin, stop = header[tensor]["data_offsets"]
            assert begin == end and header[tensor]["dtype"] in DTYPE_BYTES
            end = stop
    assert len({name for name, _, _ in tensors}) == len(tensors)
