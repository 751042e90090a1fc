"""Token shards read by random access: windows, epochs, rows per process, exact resume,
validation, llm.c headers, and one-line errors for bad shards (also through the CLI)."""

import dataclasses
import json

import numpy as np
import pytest

from edit_jax import data, token_shards
from edit_jax.cli import main
from edit_jax.config import DataConfig, load_config
from edit_jax.errors import UserError
from edit_jax.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


def _raw_shards(tmp_path, sizes=(100, 50), val=None, dtype=np.uint16):
    """Shards whose token at position p of shard s is 1000 * s + p (ids identify positions)."""
    for s, n in enumerate(sizes):
        (1000 * s + np.arange(n)).astype(dtype).tofile(tmp_path / f"train_{s:02d}.bin")
    if val is not None:
        (5000 + np.arange(val)).astype(dtype).tofile(tmp_path / "val_00.bin")
    return tmp_path


def _cfg(tmp_path, **changes) -> DataConfig:
    base = DataConfig(source="tokens", paths=(str(tmp_path),), tokenizer="byte", seq_len=8,
                      global_batch_size=4)
    return dataclasses.replace(base, **changes)


def _iterator(cfg, vocab=10_000, process_index=0, process_count=1):
    return data.train_iterator(cfg, BYTES, process_index=process_index,
                               process_count=process_count, vocab_size=vocab)


def test_windows_cover_every_shard_window_once_per_epoch(tmp_path):
    cfg = _cfg(_raw_shards(tmp_path, val=30))
    # Windows of 9: shard 0 (100 tokens) has 11, shard 1 (50 tokens) 5; remainders dropped.
    expected = {(s, k) for s, n in ((0, 11), (1, 5)) for k in range(n)}
    iterator = _iterator(cfg)
    rows = np.concatenate([next(iterator) for _ in range(4)])  # 16 windows: one epoch
    assert rows.shape == (16, 9) and rows.dtype == np.int32
    seen = set()
    for row in rows:
        shard, start = divmod(int(row[0]), 1000)
        assert start % 9 == 0 and (row == row[0] + np.arange(9)).all()  # a contiguous window
        seen.add((shard, start // 9))
    assert seen == expected
    assert [(int(r[0]) // 1000, int(r[0]) % 1000 // 9) for r in rows] != sorted(expected)
    second = np.concatenate([next(iterator) for _ in range(4)])  # a new order every epoch
    assert sorted(map(tuple, second.tolist())) == sorted(map(tuple, rows.tolist()))
    assert (second != rows).any()


def test_rows_per_process_and_exact_resume(tmp_path):
    cfg = _cfg(_raw_shards(tmp_path, val=30))
    one = _iterator(cfg)
    halves = [_iterator(cfg, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(3):
        np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), next(one))
    states = [json.loads(json.dumps(it.get_state())) for it in (one, *halves)]
    assert states[0] == states[1] == states[2]
    expected = [next(one) for _ in range(6)]
    resumed = _iterator(cfg)
    resumed.set_state(states[0])
    for batch in expected:
        np.testing.assert_array_equal(next(resumed), batch)


def test_validation_files_or_the_held_out_tail(tmp_path):
    (tmp_path / "a").mkdir()
    with_val = _cfg(_raw_shards(tmp_path / "a", val=30))
    batches = data.eval_batches(with_val, BYTES, num_batches=1, process_index=0, process_count=1,
                                vocab_size=10_000)
    # 30 validation tokens fill 3 of the batch's 4 windows of 9; the split repeats to fill 36.
    np.testing.assert_array_equal(batches[0].ravel(), np.resize(5000 + np.arange(30), 36))
    (tmp_path / "b").mkdir()
    tail = _cfg(_raw_shards(tmp_path / "b", sizes=(100, 200)), val_fraction=0.1)
    # No val file: the last 20 tokens of the last shard (10%) are validation, not training.
    val = token_shards.val_tokens(token_shards.open_shards(tail.paths, val_fraction=0.1), 20,
                                  10_000)
    np.testing.assert_array_equal(val, 1000 + np.arange(180, 200))
    iterator = _iterator(tail)
    rows = np.concatenate([next(iterator) for _ in range(31)])
    assert rows[rows >= 1000].max() < 1180  # 180 // 9 = 20 windows of shard 1, none in the tail


def test_llmc_header_gives_dtype_and_count(tmp_path):
    header = np.zeros(256, np.int32)
    header[:3] = (20240520, 2, 40)  # version 2: uint32 tokens
    tokens = np.arange(70_000, 70_040, dtype=np.uint32)
    (tmp_path / "fineweb_train_000001.bin").write_bytes(header.tobytes() + tokens.tobytes())
    (tmp_path / "fineweb_val_000000.bin").write_bytes(header.tobytes() + tokens.tobytes())
    shard_set = token_shards.open_shards([str(tmp_path)])
    train, = shard_set.split("train")
    assert (train.dtype, train.tokens, train.offset) == (np.dtype("<u4"), 40, 1024)
    batch = next(_iterator(_cfg(tmp_path, global_batch_size=2), vocab=80_000))
    assert set(batch[:, 0].tolist()) <= {70_000 + 9 * k for k in range(4)}
    header[2] = 41  # says more tokens than the file has
    (tmp_path / "fineweb_val_000000.bin").write_bytes(header.tobytes() + tokens.tobytes())
    with pytest.raises(UserError, match="header says 41 tokens but the file has 160 bytes"):
        token_shards.open_shards([str(tmp_path)])


def test_bad_shards_are_one_line_errors(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(UserError, match="3 bytes, not a multiple of uint16's 2; set "
                                        "data.token_dtype"):
        token_shards.open_shards([str(tmp_path / "odd")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no token shards in data.paths entry"):
        token_shards.open_shards([str(tmp_path / "empty")])
    (tmp_path / "big").mkdir()
    np.array([1, 2, 300, 4] * 20, np.uint16).tofile(tmp_path / "big" / "train.bin")
    with pytest.raises(UserError, match="holds id 300, but the model's vocabulary has 257 ids"):
        next(_iterator(_cfg(tmp_path / "big"), vocab=257))


def test_cli_errors_for_token_shards(tmp_path, capsys):
    _raw_shards(tmp_path, val=30)
    base = ["train", "data.source=tokens", f"data.paths=[{tmp_path}]", "run.progress=false",
            f"run.run_dir={tmp_path / 'run'}"]
    assert main(base) == 2
    assert "raw .bin token shards do not say which tokenizer made them" in capsys.readouterr().err
    assert main([*base, "data.tokenizer=bpe"]) == 2
    assert "token shards are tokenized already" in capsys.readouterr().err
    assert main(["train", "data.source=tokens", "run.progress=false"]) == 2
    assert "data.source=tokens needs data.paths" in capsys.readouterr().err
    assert main([*base[:2], f"data.paths=[{tmp_path / 'nothing'}]"]) == 2
    assert "no token shards in data.paths entry" in capsys.readouterr().err.strip()
    assert not (tmp_path / "run").exists()


def test_prepared_index_must_match_its_shards(tmp_path):
    assert main(["prepare", "--out", str(tmp_path / "kjv")]) == 0
    index = json.loads((tmp_path / "kjv" / "index.json").read_text())
    assert load_config(None, ["data.source=tokens", f"data.paths=[{tmp_path / 'kjv'}]"]
                       ).data.tokenizer == "byte"
    shard = tmp_path / "kjv" / index["shards"][0]["file"]
    size = 2 * index["shards"][0]["tokens"]
    assert shard.stat().st_size == size
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=f"has {size - 2:,} bytes but index.json says {size:,}"):
        token_shards.open_shards([str(tmp_path / "kjv")])
    shard.unlink()
    with pytest.raises(UserError, match="is missing but index.json says"):
        token_shards.open_shards([str(tmp_path / "kjv")])
