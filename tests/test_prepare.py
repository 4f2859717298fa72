"""Real-corpus path (issue 20): the parallel prepare command, Megatron indexed datasets, BOS framing end to end,
the vocabulary sized from the tokenizer before any tokenising, and validation sets without repeated rows."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import TINY_MODEL, _fast_cpu, corpus_texts  # noqa: F401  (fixture)

from xmodel.prepare import main as prepare_main
from xmodel.train import main as train_main
from xmodel.training.config import ConfigError, TrainConfig
from xmodel.training.data import SourceSpec, TokenSource, eval_batches, load_source, open_prepared
from xmodel.training.megatron import IndexedDataset, write_indexed_dataset
from xmodel.training.preprocess import _framed, prepare
from xmodel.training.tokenizer import TextTokenizer, encode_ids, train_bpe

TEXTS = [f"Record {i}: {'alpha beta gamma ' * (i % 7 + 1)}and the number {i * 13}." for i in range(300)]
SMALL_MODEL = [a for a in TINY_MODEL if a not in ("--model.vocab_size", "512")]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """One 300-id BPE in two directories: its tokenizer_config.json says add_bos_token true in one, false in the
    other (the DeepSeek-V3 repository's says true)."""
    root = tmp_path_factory.mktemp("toks")
    train_bpe(TEXTS + corpus_texts()[:10], 300, root / "bos" / "tokenizer.json")
    cfg = json.loads((root / "bos" / "tokenizer_config.json").read_text())
    (root / "bos" / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    (root / "plain").mkdir()
    (root / "plain" / "tokenizer.json").write_bytes((root / "bos" / "tokenizer.json").read_bytes())
    (root / "plain" / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    return root


def write_jsonl(path: Path, texts, field="text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- prepare
def test_prepare_stream_is_the_same_for_any_worker_count_and_resumes(tok_dirs, tmp_path):
    tok = TextTokenizer.load(tok_dirs / "bos")
    framing = tok.framing("auto")
    assert framing.bos_id == 0 and framing.eos_id == 1  # add_bos_token true: BOS + document + EOS
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    (tmp_path / "b.txt").write_text(TEXTS[0])
    files = [src, tmp_path / "b.txt"]
    full = tok.tokenizer.encode_batch(TEXTS + TEXTS[:1], add_special_tokens=False)  # with offsets: the reference
    expected = [t for enc in full for t in [0, *enc.ids, 1]]
    streams = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        manifest = prepare(files, tok, framing, out, workers=workers, progress=False, log=lambda m: None,
                           chunk_bytes=3000)  # several parts per file
        assert len(manifest["parts"]) > 3 and manifest["documents"] == 301
        streams[workers] = open_prepared(out, tok, framing)[:].tolist()
    assert streams[1] == streams[2] == expected
    # interrupted: one part and the manifest gone -> only that part is redone
    out = tmp_path / "w2"
    (out / "parts" / "000002.bin").unlink()
    (out / "manifest.json").unlink()
    logs = []
    prepare(files, tok, framing, out, workers=2, progress=False, log=logs.append, chunk_bytes=3000)
    n = len(json.loads((out / "manifest.json").read_text())["parts"])
    assert f"resuming: {n - 1} of {n} part(s) already done" in logs[0]
    assert open_prepared(out, tok, framing)[:].tolist() == expected
    assert "prepared 301 documents" in logs[-1] and "tokens/s" in logs[-1]


def test_ids_only_encoding_and_framing_match_the_full_encoding(tok_dirs):
    """The preparation encodes without offsets (``encode_batch_fast``) and frames the ids straight into the shard
    dtype: the ids must be those of the full ``encode_batch``, for ASCII, non-ASCII, digits, CJK and empty text."""
    tok = TextTokenizer.load(tok_dirs / "plain")
    texts = ["déjà vu: naïve café ☕ 12345678 and 東京タワー", "", "def f(x):\n\treturn x ** 2  # ünïcödé\r\n",
             *corpus_texts()[:3], "x" * 1000 + " 3.14159 ¡¿ 🙂🙂"]
    full = [e.ids for e in tok.tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert [e.ids for e in encode_ids(tok.tokenizer, texts)] == tok.encode_batch(texts) == full
    for bos, dtype in ((None, np.uint16), (0, np.uint32)):
        arr = _framed(full, bos, 1, np.dtype(dtype))
        assert arr.dtype == dtype
        assert arr.tolist() == [t for ids in full for t in ([bos] if bos is not None else []) + ids + [1]]
    assert _framed([], 0, 1, np.dtype(np.uint16)).shape == (0,)


def test_prepare_cli_and_training_on_the_directory(tok_dirs, tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", corpus_texts()[:30], field="body")
    out = tmp_path / "prepared"
    argv = [str(tmp_path / "*.jsonl"), "--tokenizer", str(tok_dirs / "plain"), "--out", str(out), "--workers", "2",
            "--text-field", "body", "--no-progress"]
    assert prepare_main(argv) == 0
    text = capsys.readouterr().out
    assert "prepared 30 documents" in text and "document + EOS" in text
    tokens = json.loads((out / "manifest.json").read_text())["tokens"]
    assert prepare_main(argv) == 0 and "resuming: 1 of 1 part(s)" in capsys.readouterr().out
    # --data DIR without --tokenizer: the manifest's tokenizer sizes the model (300 ids -> the preset's 4096)
    run = tmp_path / "runs"
    args = [*SMALL_MODEL, "--data", str(out), "--out-dir", str(run), "--steps", "2", "--seq-len", "32",
            "--batch-size", "2", "--no-progress", "--no-export-hf", "--eval-batches", "1",
            "--cache-dir", str(tmp_path / "cache")]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "vocab 4096" in printed and f"validation" in printed
    assert not (tmp_path / "cache" / "shards").exists()  # nothing tokenised again
    assert tokens > 0


BAD = {  # file name -> (content, what the error says)
    "empty.jsonl": (b"", "the file is empty"),
    "nofield.jsonl": (b'{"content": "x"}\n', "the first record has no string field 'text'"),
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "the line at byte 15 is not UTF-8"),
    "notjson.jsonl": (b'{"text": "ok"}\n{"text": \n', "the line at byte 15 is not valid JSON"),
    "latin1.txt": (b"caf\xe9 au lait", "not UTF-8 text (byte 3)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_named_or_skipped_and_counted(tok_dirs, tmp_path, capsys, name):
    content, message = BAD[name]
    (tmp_path / name).write_bytes(content)
    good = write_jsonl(tmp_path / "good.jsonl", TEXTS[:5])
    argv = [str(tmp_path / name), str(good), "--tokenizer", str(tok_dirs / "plain"), "--workers", "1",
            "--no-progress"]
    assert prepare_main([*argv, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / name}: {message}") and "Traceback" not in err, err
    assert prepare_main([*argv, "--out", str(tmp_path / "o2"), "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert len(manifest["skipped_files"]) + manifest["bad_records"] == 1
    assert manifest["documents"] == 5 + (1 if name in ("latin1.jsonl", "notjson.jsonl") else 0)


def test_parquet_without_the_column_and_missing_file(tok_dirs, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow", reason="parquet input needs pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": TEXTS[:3]}), tmp_path / "p.parquet")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing")
    for name, message in [("p.parquet", f"{tmp_path / 'p.parquet'}: no column 'text' (columns: body)"),
                          ("gone.jsonl", f"--sources: no such file or directory: {tmp_path / 'gone.jsonl'}")]:
        assert prepare_main([str(tmp_path / name), "--tokenizer", str(tok_dirs / "plain"), "--out",
                             str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------------- Megatron
def test_megatron_indexed_dataset_by_prefix_or_bin(tok_dirs, tmp_path):
    tok = TextTokenizer.load(tok_dirs / "plain")
    framing = tok.framing("auto")
    docs = [ids for ids in tok.encode_batch(TEXTS[:40])]
    with_eod = write_indexed_dataset(tmp_path / "eod_text_document", [d + [1] for d in docs])
    bare = write_indexed_dataset(tmp_path / "bare_text_document", docs, dtype=np.uint16)
    ds = IndexedDataset(with_eod)
    assert ds.num_documents == 40 and ds.document(3).tolist() == docs[3] + [1]
    expected = [t for d in docs for t in d + [1]]
    for name in (str(with_eod), str(with_eod) + ".bin", str(bare), str(bare) + ".idx"):
        src = load_source(SourceSpec(name), tok, tmp_path / "cache", 16, framing=framing, log=lambda m: None)
        assert src.shards[0][:].tolist() == expected, name  # EOS inserted between the bare documents
    # an .idx that does not describe its .bin, and a .bin in no known format
    (tmp_path / "bad_text_document.bin").write_bytes((tmp_path / "eod_text_document.bin").read_bytes()[:-8])
    (tmp_path / "bad_text_document.idx").write_bytes((tmp_path / "eod_text_document.idx").read_bytes())
    with pytest.raises(ValueError, match="bad_text_document.idx does not match .*bad_text_document.bin"):
        load_source(SourceSpec(str(tmp_path / "bad_text_document")), tok, tmp_path / "cache", 16, framing=framing)
    (tmp_path / "other.bin").write_bytes(b"\x01\x02" * 64)
    with pytest.raises(ValueError, match=r"other.bin is not a token shard .*Megatron-LM indexed dataset \(PREFIX.bin"):
        load_source(SourceSpec(str(tmp_path / "other.bin")), tok, tmp_path / "cache", 16, framing=framing)


# ---------------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_follows_the_tokenizer_and_conflicts_exit_2_before_tokenising(tmp_path, capsys):
    from xmodel.training.prepare import build_model_config

    big = tmp_path / "big" / "tokenizer.json"
    train_bpe(corpus_texts(), 4200, big)  # more ids than the cpu-default preset's 4096
    ids = TextTokenizer.load(big).vocab_size
    assert 4096 < ids <= 4224
    data = write_jsonl(tmp_path / "d.jsonl", corpus_texts()[:5])
    assert build_model_config(TrainConfig(tokenizer=str(big), data=[str(data)])).vocab_size == 4224  # rounded to 128
    assert build_model_config(TrainConfig(preset="xmodel-2.5", tokenizer=str(big), data=[str(data)])).vocab_size == 129280
    with pytest.raises(ConfigError, match="--vocab-size: 8192 sizes the default BPE, which --tokenizer"):
        TrainConfig(tokenizer=str(big), vocab_size=8192)
    cache = tmp_path / "cache"
    base = ["--tokenizer", str(big), "--data", str(data), "--cache-dir", str(cache), "--out-dir", str(tmp_path / "r")]
    assert train_main([*base, "--model.vocab_size", "4096"]) == 2
    err = capsys.readouterr().err
    assert f"--model.vocab_size 4096 is smaller than the {ids} ids" in err and "Traceback" not in err
    assert train_main([*base, "--vocab-size", "129280"]) == 2
    assert "--vocab-size: 129280 sizes the default BPE" in capsys.readouterr().err
    assert not (cache / "shards").exists() and not (tmp_path / "r").exists()  # refused before any tokenising


# ---------------------------------------------------------------------------------------------------- BOS framing
@pytest.mark.parametrize("tok_name, bos, expect_bos", [("bos", "auto", True), ("bos", "never", False)])
def test_framing_end_to_end_train_export_generate(tok_dirs, tmp_path, capsys, tok_name, bos, expect_bos):
    from tokenizers import Tokenizer

    from xmodel.generate import main as generate_main

    data = write_jsonl(tmp_path / "d.jsonl", corpus_texts()[:20])
    run = tmp_path / "runs"
    args = [*SMALL_MODEL, "--tokenizer", str(tok_dirs / tok_name), "--data", str(data), "--bos", bos,
            "--out-dir", str(run), "--name", "r", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
            "--no-progress", "--eval-batches", "1", "--cache-dir", str(tmp_path / "cache"), "--prepare-workers", "1"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert ("BOS + document + EOS" if expect_bos else "documents framed as document + EOS") in out
    meta = json.loads(next((run / "r" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["identity"]["framing"] == [0 if expect_bos else None, 1]
    shard = next((tmp_path / "cache" / "shards").glob("*/parts/000000.bin"))
    from xmodel.training.data import read_shard

    assert (int(read_shard(shard)[0]) == 0) == expect_bos  # the stream starts with BOS exactly when framed so
    hf = run / "r" / "hf"
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is expect_bos and config["add_eos_token"] is False
    ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode("The quick fox").ids
    plain = TextTokenizer.load(tok_dirs / tok_name).encode_batch(["The quick fox"])[0]
    assert ids == ([0] if expect_bos else []) + plain  # generate encodes prompts the way training framed documents
    assert generate_main(["--checkpoint", str(hf), "--prompt", "The quick fox", "--max-new-tokens", "2",
                          "--no-stream"]) == 0
    # python -m xmodel.export re-frames the tokenizer from the checkpoint's identity, whatever directory it finds
    from xmodel.export import export_checkpoint

    again = export_checkpoint(run / "r", tmp_path / "hf2", log=lambda m: None)
    assert json.loads((again / "tokenizer_config.json").read_text())["add_bos_token"] is expect_bos


# ---------------------------------------------------------------------------------------------------- validation
def test_validation_never_repeats_a_row():
    src = TokenSource("v", [np.arange(1000)], seq_len=10)  # 99 windows
    head, val = src.split_count(5)
    batches = eval_batches([val], num_batches=4, batch_size=4)  # asks for 16, 5 exist
    rows = torch.cat(batches)
    assert rows.shape[0] == 5 and len({tuple(r.tolist()) for r in rows}) == 5
    halves = [eval_batches([val], 4, 4, rank=r, world=2) for r in range(2)]  # 4 rows: 2 per rank, never a repeat
    both = torch.cat([torch.cat(h) for h in halves])
    assert both.shape[0] == 4 and len({tuple(r.tolist()) for r in both}) == 4
    assert sum(b.shape[0] for b in eval_batches([src], 1, 8, num_windows=30)) == 30  # --val-tokens: 30 windows


def test_val_tokens_sets_the_size_and_small_sets_warn(tok_dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", corpus_texts()[:20])
    args = [*SMALL_MODEL, "--tokenizer", str(tok_dirs / "plain"), "--data", str(data), "--out-dir",
            str(tmp_path / "r"), "--steps", "1", "--seq-len", "32", "--batch-size", "2", "--no-progress",
            "--no-export-hf", "--cache-dir", str(tmp_path / "cache"), "--prepare-workers", "1", "--val-tokens", "300"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "validation 10 sequences x 32 = 320 tokens (5 batches, each sequence once" in out
    assert "warning: the validation set is small (320 tokens < 65,536)" in out
