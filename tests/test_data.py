"""Documents, validation hold-out, packing, batches, rows per process, resumable state."""

import dataclasses
import json
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from edit_jax import data
from edit_jax.config import DataConfig
from edit_jax.errors import UserError
from edit_jax.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()
EOS = BYTES.eos_id
BUNDLED = DataConfig(seq_len=128, global_batch_size=16)


def _take(iterator, n: int) -> list[np.ndarray]:
    return [next(iterator) for _ in range(n)]


def _whole_documents(batches: list[np.ndarray]) -> list[str]:
    """The documents lying wholly inside the token stream that the rows of `batches` form."""
    stream = np.concatenate([row for batch_BxT in batches for row in batch_BxT])
    eos_positions = np.flatnonzero(stream == EOS)
    return [BYTES.decode(stream[a + 1:b]) for a, b in zip(eos_positions[:-1], eos_positions[1:])]


def test_bundled_documents_are_chapters_split_into_train_and_val():
    train, val = data.train_documents(BUNDLED), data.val_documents(BUNDLED)
    # 1189 chapters; val_fraction 0.02 holds out every 50th: 1189 // 50 = 23.
    assert (len(train), len(val)) == (1166, 23)
    assert train[0].startswith("In the beginning God created the heaven and the earth. "
                               "And the earth was without form")
    assert val[0] == data._bundled_documents()[49]  # Genesis 50, the 50th chapter
    assert val[0].startswith("And Joseph fell upon his father's face")
    assert not set(train) & set(val)
    assert len(set(train) | set(val)) == 1189


def test_bundled_corpus_loads_without_setuptools():
    """As in a new Python 3.12 venv: no setuptools, so the `bible` package cannot be imported."""
    code = ("import sys; sys.modules['pkg_resources'] = sys.modules['setuptools'] = None\n"
            "from edit_jax import data\n"
            "docs = data._bundled_documents()\n"
            "assert 'bible' not in sys.modules\n"
            "print(len(docs), docs[0][:16])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1189 In the beginning"


def test_held_out_rule_on_hand_made_lists():
    docs = [str(i) for i in range(120)]
    val = data.HeldOut(docs, 50, validation=True)
    train = data.HeldOut(docs, 50, validation=False)
    assert list(val) == ["49", "99"]
    assert list(train) == [str(i) for i in range(120) if i not in (49, 99)]
    few = [str(i) for i in range(5)]  # fewer than k documents: the last one is held out
    assert list(data.HeldOut(few, 50, validation=True)) == ["4"]
    assert list(data.HeldOut(few, 50, validation=False)) == ["0", "1", "2", "3"]
    with pytest.raises(UserError, match=r"1 document\(s\), too few to hold out a validation set"):
        data.HeldOut(["only"], 50, validation=True)


def test_concat_then_split_windows_and_json_state():
    docs = [np.array(d, np.int32) for d in ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11, 12, 13])]
    windows = data.ConcatThenSplit(grain.MapDataset.source(docs).to_iter_dataset(), 4)
    expected = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]  # 13 is left over and dropped
    assert [w.tolist() for w in windows] == expected
    for done in range(len(expected) + 1):  # resume after every window, state through JSON
        iterator = iter(windows)
        _take(iterator, done)
        state = json.loads(json.dumps(iterator.get_state()))
        resumed = iter(windows)
        resumed.set_state(state)
        assert [w.tolist() for w in resumed] == expected[done:]


def test_concat_then_split_state_at_document_boundary():
    """grain's ConcatThenSplitIterDataset skips a window here after a JSON round trip."""
    docs = [np.full(4, i, np.int32) for i in range(6)]
    windows = data.ConcatThenSplit(grain.MapDataset.source(docs).to_iter_dataset(), 4)
    iterator = iter(windows)
    _take(iterator, 2)
    resumed = iter(windows)
    resumed.set_state(json.loads(json.dumps(iterator.get_state())))
    assert [w[0] for w in resumed] == [2, 3, 4, 5]


def test_train_batches_are_whole_shuffled_documents_cut_into_windows():
    batches = _take(data.train_iterator(BUNDLED, BYTES, process_index=0, process_count=1), 30)
    assert all(b.shape == (16, 129) and b.dtype == np.int32 for b in batches)
    # Rows are consecutive windows of one stream: the text between two EOS is a training document.
    whole = _whole_documents(batches)
    assert len(whole) > 10
    assert set(whole) <= set(data.train_documents(BUNDLED))
    assert whole[:3] != list(data.train_documents(BUNDLED))[:3]  # shuffled
    again = _take(data.train_iterator(BUNDLED, BYTES, process_index=0, process_count=1), 30)
    assert all((a == b).all() for a, b in zip(batches, again))
    reseeded = dataclasses.replace(BUNDLED, shuffle_seed=1)
    other = next(data.train_iterator(reseeded, BYTES, process_index=0, process_count=1))
    assert not (other == batches[0]).all()


def _process_iterators(count: int) -> list:
    return [data.train_iterator(BUNDLED, BYTES, process_index=p, process_count=count)
            for p in range(count)]


def _assert_slices_make_the_batches(slices: list, whole, steps: int) -> None:
    """Process p's batch is rows [p*B/P, (p+1)*B/P) of the one-process global batch, each step."""
    for _ in range(steps):
        parts = [next(iterator) for iterator in slices]
        assert all(part.shape == (16 // len(slices), 129) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), next(whole))


def test_global_batches_do_not_depend_on_the_process_count():
    for count, steps in ((2, 12), (4, 3)):
        [one] = _process_iterators(1)
        _assert_slices_make_the_batches(_process_iterators(count), one, steps)


def test_state_is_the_same_on_every_process_and_resumes_exactly():
    [one], two = _process_iterators(1), _process_iterators(2)
    _assert_slices_make_the_batches(two, one, 5)
    states = [json.loads(json.dumps(iterator.get_state())) for iterator in [one, *two]]
    assert states[0] == states[1] == states[2]
    resumed = _process_iterators(2)
    for iterator, state in zip(resumed, states[1:]):
        iterator.set_state(state)
    _assert_slices_make_the_batches(resumed, one, 6)


def test_eval_batches_fixed_and_split_over_processes():
    one = data.eval_batches(BUNDLED, BYTES, num_batches=4, process_index=0, process_count=1)
    assert len(one) == 4 and all(b.shape == (16, 129) and b.dtype == np.int32 for b in one)
    again = data.eval_batches(BUNDLED, BYTES, num_batches=4, process_index=0, process_count=1)
    assert all((a == b).all() for a, b in zip(one, again))
    first_val = BYTES.encode(data.val_documents(BUNDLED)[0])
    assert one[0][0].tolist() == first_val[:129].tolist()
    halves = [data.eval_batches(BUNDLED, BYTES, num_batches=4, process_index=p, process_count=2)
              for p in (0, 1)]
    for k in range(4):  # the global batches do not depend on the number of processes
        assert (np.concatenate([halves[0][k], halves[1][k]]) == one[k]).all()


def test_small_validation_split_is_repeated_to_fill_one_batch(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in "abcd"))
    cfg = DataConfig(source="files", paths=(str(path),), val_fraction=0.5, seq_len=2,
                     global_batch_size=2)
    assert list(data.val_documents(cfg)) == ["b", "d"]
    batches = data.eval_batches(cfg, BYTES, num_batches=3, process_index=0, process_count=1)
    # 'b' EOS 'd' EOS, repeated to 6 tokens, cut into 2 windows of 3.
    assert [b.tolist() for b in batches] == [[[98, EOS, 100], [EOS, 98, EOS]]]


def test_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nline two\n\n\npara two\n  \npara three\n")
    (tmp_path / "b.jsonl").write_text('{"body": "json one"}\n\n{"body": "json two", "x": 1}\n')
    cfg = DataConfig(source="files", paths=(str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl"),
                                            str(tmp_path / "a.txt")),
                     text_field="body", val_fraction=0.5)
    docs = data._file_documents(cfg.paths, cfg.text_field)
    assert docs == ["para one\nline two", "para two", "para three", "json one", "json two"]
    assert list(data.val_documents(cfg)) == ["para two", "json one"]
    assert list(data.train_documents(cfg)) == ["para one\nline two", "para three", "json two"]
    batch = next(data.train_iterator(dataclasses.replace(cfg, seq_len=4, global_batch_size=2),
                                     BYTES, process_index=0, process_count=1))
    assert batch.shape == (2, 5)


def test_corpus_id_is_short_stable_and_tracks_the_corpus(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo\n")
    files = DataConfig(source="files", paths=(str(path),))
    first = data.corpus_id(files)
    assert first == data.corpus_id(files) and first.startswith("files-") and len(first) == 18
    assert data.corpus_id(BUNDLED) != first
    assert data.corpus_id(dataclasses.replace(files, val_fraction=0.1)) != first
    path.write_text("one\n\ntwo\n\nthree\n")
    assert data.corpus_id(files) != first


class EditJaxTinyText(tfds.core.GeneratorBasedBuilder):
    """A tiny text dataset, prepared offline in array_record format (no TensorFlow needed)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", 30),
                "test": self._generate_examples("test", 4)}

    def _generate_examples(self, split, count):
        for i in range(count):
            yield i, {"text": f"{split} document {i}. " * 5, "id": i}


@pytest.fixture(scope="module")
def tfds_cfg(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    EditJaxTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return DataConfig(source="tfds", tfds_name="edit_jax_tiny_text", tfds_data_dir=str(data_dir),
                      val_fraction=0.1, seq_len=16, global_batch_size=4)


def test_tfds_source(tfds_cfg):
    train, val = data.train_documents(tfds_cfg), data.val_documents(tfds_cfg)
    assert (len(train), len(val)) == (27, 3)  # every 10th of 30 held out
    expected = {f"train document {i}. " * 5 for i in range(30)}
    assert set(train) | set(val) == expected and not set(train) & set(val)
    with_test = dataclasses.replace(tfds_cfg, val_split="test")
    assert len(data.train_documents(with_test)) == 30
    assert sorted(data.val_documents(with_test)) == [f"test document {i}. " * 5 for i in range(4)]
    iterator = data.train_iterator(with_test, BYTES, process_index=0, process_count=1)
    batches = _take(iterator, 20)
    assert batches[0].shape == (4, 17)
    assert set(_whole_documents(batches)) <= expected
    evals = data.eval_batches(with_test, BYTES, num_batches=2, process_index=0, process_count=1)
    assert len(evals) == 2 and BYTES.decode(evals[0][0]).startswith("test document")


def test_tfds_errors(tfds_cfg, tmp_path):
    with pytest.raises(UserError, match=r"'edit_jax_tiny_text' is not prepared in array_record "
                                        r"format under .*; prepare it with `tfds build"):
        data.train_documents(dataclasses.replace(tfds_cfg, tfds_data_dir=str(tmp_path)))
    with pytest.raises(UserError, match=r"'no_such_dataset_xyz' is not prepared .*tfds_data_dir"):
        data.train_documents(dataclasses.replace(tfds_cfg, tfds_name="no_such_dataset_xyz"))
    with pytest.raises(UserError, match=r"cannot open split 'validation' .*Unknown split"):
        data.val_documents(dataclasses.replace(tfds_cfg, val_split="validation"))
    with pytest.raises(UserError, match=r"has no feature 'content'; .* one of: id, text"):
        data.train_documents(dataclasses.replace(tfds_cfg, text_field="content"))


def test_file_errors(tmp_path):
    def files(*paths, **kw):
        return data.train_documents(DataConfig(source="files", paths=paths, **kw))

    with pytest.raises(UserError, match=r"data file not found: .*nope\.txt; set data.paths"):
        files(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match=r"no files match data.paths pattern '.*\*\.jsonl'"):
        files(str(tmp_path / "*.jsonl"))
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"unsupported data file .*c\.csv; data.paths takes .txt"):
        files(str(tmp_path / "c.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: no string field 'text'; set data.text_f"):
        files(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(UserError, match=r"broken\.jsonl:3: invalid JSON"):
        files(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match=r"no documents in data.paths=.*the files are empty"):
        files(str(tmp_path / "empty.txt"))
    (tmp_path / "one.txt").write_text("a single paragraph\n")
    with pytest.raises(UserError, match=r"1 document\(s\), too few to hold out"):
        files(str(tmp_path / "one.txt"))


def test_config_errors():
    not_divisible = r"global_batch_size=16 is not divisible by the 3 processes; set it to a mult"
    with pytest.raises(UserError, match=not_divisible):
        data.train_iterator(BUNDLED, BYTES, process_index=0, process_count=3)
    with pytest.raises(UserError, match=not_divisible):
        data.eval_batches(BUNDLED, BYTES, num_batches=1, process_index=0, process_count=3)
    with pytest.raises(UserError, match=r"'data.shuffle_seed': -1 must be in \[0, 2\*\*32\)"):
        data.train_iterator(dataclasses.replace(BUNDLED, shuffle_seed=-1), BYTES,
                            process_index=0, process_count=1)
    with pytest.raises(UserError, match=r"unknown data.source 'hdfs'; use bundled, files or tfds"):
        data.train_documents(dataclasses.replace(BUNDLED, source="hdfs"))
