"""`edit-jax prepare`: shards hold exactly the documents (split as data.source=files splits
them), in parallel over files, with a uint32 fallback, resume after a failure, and errors."""

import dataclasses
import gzip
import json

import numpy as np
import pytest
import tokenizers
from runs import train
from tokenizers import models, pre_tokenizers

from edit_jax import data, token_shards
from edit_jax.cli import main
from edit_jax.config import DataConfig, load_config
from edit_jax.data import load_tokenizer
from edit_jax.errors import UserError
from edit_jax import prepare as prepare_module
from edit_jax.prepare import _Progress, prepare
from edit_jax.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


def _split_documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    assert tokens[-1] == eos
    ends = np.flatnonzero(tokens == eos)
    return [tokens[a + 1:b] for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]


def _shard_tokens(out, index, split, source=None) -> np.ndarray:
    files = [s["file"] for s in index["shards"]
             if s["split"] == split and source in (None, s["source"])]
    return np.concatenate([np.fromfile(out / f, dtype=index["dtype"]) for f in files])


def test_bundled_corpus_shards_hold_the_held_out_split_exactly(tmp_path):
    out = tmp_path / "kjv"
    index = prepare(DataConfig(), out, progress=False)
    cfg = DataConfig()
    for split, documents in (("train", data.train_documents(cfg)), ("val", data.val_documents(cfg))):
        expected = np.concatenate([data.encode_with_eos(BYTES, d) for d in documents])
        np.testing.assert_array_equal(_shard_tokens(out, index, split), expected)
        assert index["documents"][split] == len(documents)
        assert index["tokens"][split] == len(expected)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 257 and index["eos_id"] == 256
    assert json.loads((out / "index.json").read_text()) == index


def test_files_in_parallel_into_several_shards_and_the_files_source_agrees(tmp_path):
    docs = {f"s{n}": [f"source {n} paragraph {i}" + " x" * (i % 7) for i in range(9 + n)]
            for n in range(3)}
    (tmp_path / "s0.txt").write_text("\n\n".join(docs["s0"]))
    (tmp_path / "s1.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"body": d}) + "\n" for d in docs["s1"]).encode()))
    (tmp_path / "s2.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs["s2"]))
    cfg = DataConfig(source="files", paths=(str(tmp_path / "s*"),), text_field="body",
                     val_fraction=0.25)
    out = tmp_path / "out"
    index = prepare(cfg, out, workers=2, shard_tokens=60, progress=False)
    for n in range(3):  # every 4th document of each source is held out
        source = docs[f"s{n}"]
        for split, wanted in (("train", [d for i, d in enumerate(source) if i % 4 != 3]),
                              ("val", [d for i, d in enumerate(source) if i % 4 == 3])):
            got = _split_documents(_shard_tokens(out, index, split, n), BYTES.eos_id)
            assert [BYTES.decode(t) for t in got] == wanted, (n, split)
    assert len([s for s in index["shards"] if s["split"] == "train"]) > 3  # ~60-token shards
    assert all(s["tokens"] < 60 + 40 for s in index["shards"])  # a document is never split
    # One source: the same validation batches as data.source=files reading the file itself.
    single = dataclasses.replace(cfg, paths=(str(tmp_path / "s2.jsonl"),), seq_len=7,
                                 global_batch_size=2)
    prepare(single, tmp_path / "one", progress=False)
    tokens = dataclasses.replace(single, source="tokens", paths=(str(tmp_path / "one"),),
                                 tokenizer="byte")
    for a, b in zip(*(data.eval_batches(c, BYTES, num_batches=2, process_index=0,
                                        process_count=1) for c in (single, tokens))):
        np.testing.assert_array_equal(a, b)


def _word_tokenizer(path, words: int):
    """A word-level tokenizer.json with `words` + 1 ids; word k is 'w<k>', EOS is the last id."""
    vocab = {f"w{k}": k for k in range(words)}
    vocab["</s>"] = words
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def test_large_vocabulary_uses_uint32_and_the_tokenizer_travels(tmp_path):
    _word_tokenizer(tmp_path / "words.json", 70_000)
    texts = [" ".join(f"w{(i * 7919 + j * 104_729) % 70_000}" for j in range(5)) for i in range(8)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    overrides = ["data.source=files", f"data.paths=[{tmp_path / 'c.jsonl'}]",
                 f"data.tokenizer={tmp_path / 'words.json'}", "data.val_fraction=0.5"]
    assert main(["prepare", "--out", str(tmp_path / "out"), *overrides]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_001
    train = _split_documents(_shard_tokens(tmp_path / "out", index, "train"), 70_000)
    assert [t.tolist() for t in train] == [[int(w[1:]) for w in t.split()] for t in texts[0::2]]
    cfg = load_config(None, ["data.source=tokens", f"data.paths=[{tmp_path / 'out'}]"])
    assert cfg.data.tokenizer == str(tmp_path / "out" / "tokenizer.json")
    assert load_tokenizer(cfg.data).vocab_size == 70_001
    tokenizer = load_tokenizer(cfg.data)
    batch = data.eval_batches(dataclasses.replace(cfg.data, seq_len=4, global_batch_size=1),
                              tokenizer, num_batches=1, process_index=0, process_count=1)[0]
    assert batch.ravel().tolist() == [int(w[1:]) for w in texts[1].split()]
    other = dataclasses.replace(cfg.data, tokenizer=str(tmp_path / "other.json"))
    _word_tokenizer(tmp_path / "other.json", 70_000)  # same ids, but another file: fine
    data.eval_batches(other, load_tokenizer(other), num_batches=1, process_index=0,
                      process_count=1)
    _word_tokenizer(tmp_path / "other.json", 70_001)
    with pytest.raises(UserError, match="is not the tokenizer the shards were prepared with"):
        data.eval_batches(other, load_tokenizer(other), num_batches=1, process_index=0,
                          process_count=1)


def test_a_failure_keeps_finished_files_and_a_rerun_resumes(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n"
                                              for i in range(5)))
    (tmp_path / "b.jsonl").write_text('{"text": "b0"}\n{"text": "b1"}\n{"oops": 1}\n')
    command = ["prepare", "--out", str(tmp_path / "out"), "--workers", "1", "data.source=files",
               f"data.paths=[{tmp_path / '*.jsonl'}]", "data.val_fraction=0.5"]
    assert main(command) == 2
    assert "b.jsonl:3: no string field 'text'" in capsys.readouterr().err
    first = tmp_path / "out" / "train-00000-0000.bin"
    assert first.is_file() and not (tmp_path / "out" / "index.json").exists()
    assert not list((tmp_path / "out").glob("*-00001-*"))  # nothing of b is taken as done
    (tmp_path / "out" / "train-00001-0000.bin.tmp").write_bytes(b"torn")  # as after a kill
    before = first.stat().st_mtime_ns
    (tmp_path / "b.jsonl").write_text('{"text": "b0"}\n{"text": "b1"}\n')
    assert main(command) == 0
    assert first.stat().st_mtime_ns == before  # a was not tokenized again
    assert not list((tmp_path / "out").glob("*.tmp"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["documents"] == {"train": 4, "val": 3}  # a: 3 + 2, b: 1 + its last
    (tmp_path / "b.jsonl").write_text('{"text": "b0"}\n{"text": "b1"}\n{"text": "b2"}\n')
    assert main(command) == 0  # b changed: redone
    assert json.loads((tmp_path / "out" / "index.json").read_text())["documents"]["train"] == 5
    assert first.stat().st_mtime_ns == before


def test_an_interrupted_file_continues_after_its_last_complete_shard(tmp_path, monkeypatch):
    texts = [f"document {i} " + "y" * (i % 5) for i in range(60)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(source="files", paths=(str(tmp_path / "big.jsonl"),), val_fraction=0.1)
    straight = prepare(cfg, tmp_path / "straight", shard_tokens=100, progress=False)
    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_BYTES", 1)  # tokenize document by document
    monkeypatch.setattr(prepare_module, "PROGRESS_EVERY_S", 0)  # report every document

    def interrupt(update, seen=[0]):
        seen[0] += update["documents"]
        if seen[0] >= 40:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_Progress", lambda report: _Progress(interrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "cut", shard_tokens=100, progress=False)
    checkpoint = json.loads((tmp_path / "cut" / ".prepare" / "source-00000.partial.json")
                            .read_text())
    assert 20 < checkpoint["placed"] < 40
    kept = {s["file"]: (tmp_path / "cut" / s["file"]).stat().st_mtime_ns
            for s in checkpoint["shards"]}
    monkeypatch.setattr(prepare_module, "_Progress", _Progress)
    resumed = prepare(cfg, tmp_path / "cut", shard_tokens=100, progress=False)
    assert {f: (tmp_path / "cut" / f).stat().st_mtime_ns for f in kept} == kept
    assert resumed["documents"] == straight["documents"] == {"train": 54, "val": 6}
    for split in ("train", "val"):  # the same documents, whatever the shard boundaries
        np.testing.assert_array_equal(_shard_tokens(tmp_path / "cut", resumed, split),
                                      _shard_tokens(tmp_path / "straight", straight, split))
    assert not (tmp_path / "cut" / ".prepare" / "source-00000.partial.json").exists()


def test_bad_outputs_and_sources_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["prepare", "--out", str(tmp_path / "full")]) == 2
    assert "is not empty and holds no token shards" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["prepare", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; name a directory" in capsys.readouterr().err
    assert main(["prepare", "--out", str(tmp_path / "x"), "data.source=tokens",
                 f"data.paths=[{tmp_path}]", "data.tokenizer=byte"]) == 2
    assert "reads data.source=bundled or files, not tokens" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("a single paragraph")
    with pytest.raises(UserError, match="no document of the corpus was held out"):
        prepare(DataConfig(source="files", paths=(str(tmp_path / "one.txt"),)),
                tmp_path / "y", progress=False)
    assert main(["prepare", "--out", "/proc/edit-jax-shards"]) == 2
    assert "cannot write to --out /proc/edit-jax-shards" in capsys.readouterr().err


def test_training_on_shards_resumes_exactly_and_writes_nothing_there(tmp_path):
    """Training from prepared shards: interrupted after step 2 and resumed, it reads the same
    token stream as an uninterrupted run (same losses), and never writes into the shards."""
    out = tmp_path / "kjv"
    assert main(["prepare", "--out", str(out)]) == 0
    listing = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    shards = ["data.source=tokens", f"data.paths=[{out}]", "method.name=ddp"]
    straight, rows = train(tmp_path / "straight", *shards, "run.steps=4")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < evals[0]
    train(tmp_path / "resumed", *shards, "run.steps=2")
    resumed, _ = train(tmp_path / "resumed", *shards, "run.steps=4")
    assert resumed == pytest.approx(straight, abs=1e-6) and len(straight) == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == listing
