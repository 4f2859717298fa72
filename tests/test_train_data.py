"""Token shards, input formats, the seeded mixture sampler, per-rank slices, and the default corpus builder."""

import json
from pathlib import Path

import numpy as np
import pytest

from xmodel.training.corpus import build_default_corpus
from xmodel.training.data import (
    HEADER_SIZE,
    MixtureSampler,
    SourceSpec,
    TokenSource,
    eval_batches,
    load_source,
    open_prepared,
    read_shard,
    tokenize_files,
    write_shard,
)
from xmodel.training.tokenizer import TextTokenizer, train_bpe

TEXTS = [f"Document {i}: the quick brown fox {'jumps over the lazy dog ' * (i % 5 + 1)}number {i * 7}." for i in range(60)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return train_bpe(TEXTS, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def stream(directory) -> list[int]:
    """The token stream of a prepared directory."""
    return open_prepared(directory, None, None)[:].tolist()


def source(tokens, seq_len, weight=1.0, name="s"):
    return TokenSource(name, [np.asarray(tokens)], seq_len, weight)


# ------------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("high", [300, 70000])
def test_shard_round_trip_dtype_and_header(tmp_path, high):
    tokens = np.random.default_rng(0).integers(0, high, size=1001)
    path = write_shard(tmp_path / "a.bin", tokens)
    shard = read_shard(path)
    assert shard.dtype.itemsize == (2 if high <= 65536 else 4)
    np.testing.assert_array_equal(np.asarray(shard), tokens)
    assert path.stat().st_size == HEADER_SIZE + 1001 * shard.dtype.itemsize


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    path = write_shard(tmp_path / "a.bin", np.arange(100))
    raw = path.read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-1])
    (tmp_path / "h.bin").write_bytes(raw[:10])
    (tmp_path / "m.bin").write_bytes(b"XXXXXXXX" + raw[8:])
    (tmp_path / "x.bin").write_bytes(raw + b"\0\0")
    for name, match in [("t", "truncated"), ("h", "shorter than"), ("m", "bad magic"), ("x", "truncated")]:
        with pytest.raises(ValueError, match=match) as info:
            read_shard(tmp_path / f"{name}.bin")
        assert f"{name}.bin" in str(info.value)


# ------------------------------------------------------------------------------------------------- inputs
def test_text_inputs_tokenize_with_eos_between_documents(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(TEXTS[0])
    (tmp_path / "d" / "b.txt").write_text(TEXTS[1])
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in TEXTS[:2]) + "\n")
    expected = tok.encode_batch([TEXTS[0]])[0] + [tok.eos_id] + tok.encode_batch([TEXTS[1]])[0] + [tok.eos_id]
    for spec in [SourceSpec(str(tmp_path / "d")), SourceSpec(str(tmp_path / "d" / "*.txt")),
                 SourceSpec(str(tmp_path / "docs.jsonl"), text_field="body")]:
        assert stream(tokenize_files(spec.files(), tok, tmp_path / "cache", spec.text_field)) == expected, spec
    # cached: the second call reuses the shard file
    files = SourceSpec(str(tmp_path / "d")).files()
    first = tokenize_files(files, tok, tmp_path / "cache")
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert tokenize_files(files, tok, tmp_path / "cache") == first and (first / "manifest.json").stat().st_mtime_ns == mtime


def test_parquet_input(tmp_path, tok):
    pa = pytest.importorskip("pyarrow", reason="parquet input needs pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS[:3], "id": [1, 2, 3]}), tmp_path / "p.parquet")
    expected = [t for ids in tok.encode_batch(TEXTS[:3]) for t in ids + [tok.eos_id]]
    assert stream(tokenize_files([tmp_path / "p.parquet"], tok, tmp_path / "cache")) == expected


def test_bad_sources(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: the line at byte 15 has no string field 'text'"):
        tokenize_files([tmp_path / "bad.jsonl"], tok, tmp_path / "cache")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        SourceSpec(str(tmp_path / "x.csv")).files()
    with pytest.raises(ValueError, match="weights must be positive"):
        SourceSpec.parse({"path": "a.txt", "weight": 0})
    for bad in ("abc", "nan", float("inf")):
        with pytest.raises(ValueError, match=r"--data: source a.txt has weight .*; weights must be positive finite"):
            SourceSpec.parse({"path": "a.txt", "weight": bad})
    assert SourceSpec.parse({"path": "a.txt", "weight": "2.5e-1"}).weight == 0.25  # YAML 1.1 reads 2.5e-1 as text
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        load_source(SourceSpec(str(tmp_path / "tiny.txt")), tok, tmp_path / "cache", seq_len=64)


# ------------------------------------------------------------------------------------------------ sampling
def test_windows_pack_with_one_token_overlap():
    src = source(np.arange(100), seq_len=10)
    assert src.num_windows == 9  # (100 - 1) // 10
    np.testing.assert_array_equal(src.window(0), np.arange(11))
    np.testing.assert_array_equal(src.window(8), np.arange(80, 91))
    head, tail = src.split(0.2)
    assert (head.num_windows, tail.num_windows) == (7, 2)
    np.testing.assert_array_equal(tail.window(0), np.arange(70, 81))


def test_mixture_is_seeded_weighted_and_covers_each_epoch():
    a, b = source(np.arange(0, 1001), 10, weight=3.0), source(np.arange(5000, 6001), 10, weight=1.0)
    s1, s2 = MixtureSampler([a, b], seed=1), MixtureSampler([a, b], seed=1)
    batches = [s1.next_batch(8) for _ in range(50)]
    for batch in batches:
        assert np.array_equal(batch.numpy(), s2.next_batch(8).numpy())
    from_a = sum(int((bt[:, 0] < 5000).sum()) for bt in batches)
    assert 0.70 < from_a / 400 < 0.80  # weight 3:1
    # within a source every window is visited once per epoch
    only = MixtureSampler([a], seed=4)
    starts = [int(only.next_batch(1)[0, 0]) for _ in range(a.num_windows)]
    assert sorted(starts) == list(range(0, 1000, 10))
    other = MixtureSampler([a, b], seed=2)
    assert not np.array_equal(other.next_batch(8).numpy(), batches[0].numpy())


def test_rank_slices_equal_the_single_process_batch_and_resume():
    srcs = [source(np.arange(0, 2001), 16, 2.0), source(np.arange(9000, 11001), 16, 1.0)]
    single = MixtureSampler(srcs, seed=0)
    ranks = [MixtureSampler(srcs, seed=0) for _ in range(2)]
    for _ in range(5):
        whole = single.next_batch(6)
        parts = [ranks[r].next_batch(3, rank=r, world=2) for r in range(2)]
        assert np.array_equal(whole.numpy(), np.concatenate([p.numpy() for p in parts]))
    state = single.state_dict()
    expected = [single.next_batch(6).numpy() for _ in range(3)]
    resumed = MixtureSampler(srcs, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in meta.json
    for e in expected:
        assert np.array_equal(resumed.next_batch(6).numpy(), e)


def test_eval_batches_fixed_and_split_over_ranks():
    srcs = [source(np.arange(0, 500), 8), source(np.arange(1000, 1300), 8)]
    whole = eval_batches(srcs, 3, 4)
    assert whole[0].shape == (4, 9)
    assert np.array_equal(whole[1].numpy(), eval_batches(srcs, 3, 4)[1].numpy())
    halves = [eval_batches(srcs, 3, 2, rank=r, world=2) for r in range(2)]
    for b in range(3):
        assert np.array_equal(whole[b].numpy(), np.concatenate([halves[0][b].numpy(), halves[1][b].numpy()]))


# ---------------------------------------------------------------------------------------- default corpus
def test_default_corpus_builder_on_a_stdlib_subset(tmp_path):
    import json as json_module

    stdlib = Path(json_module.__file__).parent  # a small real slice of the stdlib
    train, val = build_default_corpus(tmp_path, max_mb=1.0, val_share=0.3, stdlib=stdlib)
    names = [json.loads(line)["name"] for line in train.read_text().splitlines()]
    val_names = [json.loads(line)["name"] for line in val.read_text().splitlines()]
    assert names and val_names and not set(names) & set(val_names)  # split by document
    assert any(n.endswith(".py") for n in names + val_names) and any(n.startswith("pydoc:") for n in names + val_names)
    # deterministic and cached
    again = build_default_corpus(tmp_path / "other", max_mb=1.0, val_share=0.3, stdlib=stdlib)
    assert again[0].read_bytes() == train.read_bytes() and again[1].read_bytes() == val.read_bytes()
    assert build_default_corpus(tmp_path, max_mb=1.0, val_share=0.3, stdlib=stdlib) == (train, val)
    # the default tokenizer on it: specials at 0/1/2, every byte encodable, round trip
    from xmodel.training.tokenizer import default_tokenizer

    tok = default_tokenizer(train, tmp_path, vocab_size=600)
    assert (tok.bos_id, tok.eos_id, tok.tokenizer.token_to_id("<|pad|>")) == (0, 1, 2)
    text = "def f(x):\n    return x ** 2  # é ü 中文 \x00"
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_token_ids_beyond_the_vocabulary_are_caught():
    from xmodel.training.data import check_token_ids

    tokens = np.arange(200) % 50
    tokens[100] = 77  # in the middle: only the per-batch check sees it when the shard is sampled
    src = source(tokens, 10, name="foreign.bin")
    check_token_ids([src], 100)
    with pytest.raises(ValueError, match="foreign.bin holds token id 77 >= the model's vocab_size 60"):
        check_token_ids([src], 60)
    check_token_ids([src], 60, sample=20)  # head and tail only: passes
    sampler = MixtureSampler([src], seed=0)
    sampler.vocab_size = 60
    with pytest.raises(ValueError, match="token id 77"):
        for _ in range(src.num_windows):
            sampler.next_batch(1)
