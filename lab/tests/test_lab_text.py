"""The text data module: stdlib and user corpora, by-file split, tokenizers, the cache, and next-token batches."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from safestep_lab import text
from safestep_lab.text import (
    IGNORE_INDEX,
    ByteTokenizer,
    WindowSampler,
    cache_root,
    files_corpus,
    make_windows,
    stdlib_corpus,
    tokenize_corpus,
    train_bpe,
)

CAP = 150_000
VOCAB = 400


@pytest.fixture(scope="module")
def corpus() -> text.Corpus:
    return stdlib_corpus(max_bytes=CAP)


@pytest.fixture
def bpe_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of text.train_bpe made through tokenize_corpus."""
    calls: list[int] = []
    real = text.train_bpe

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(text, "train_bpe", counting)
    return calls


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


# ----------------------------------------------------------------------------------------------------------- corpus


def test_stdlib_corpus_is_deterministic_capped_and_described(corpus: text.Corpus) -> None:
    again = stdlib_corpus(max_bytes=CAP)
    assert again.names == corpus.names and again.texts == corpus.texts and again.content_hash == corpus.content_hash
    assert list(corpus.names) == sorted(corpus.names)
    assert CAP - 5_000 < corpus.meta["bytes"] <= CAP
    assert corpus.meta["bytes"] == sum(len(t.encode()) for t in corpus.texts)
    assert corpus.meta["python"] == platform.python_version()
    assert Path(corpus.meta["stdlib"]).is_dir()
    assert all(name.endswith(".py") for name in corpus.names)
    forbidden = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not any(forbidden & set(name.split("/")[:-1]) for name in corpus.names)
    cut = corpus.meta["truncated"]
    assert cut in corpus.names and corpus.texts[corpus.names.index(cut)].endswith("\n")


def test_a_larger_cap_keeps_a_superset_and_the_split_per_file(corpus: text.Corpus) -> None:
    larger = stdlib_corpus(max_bytes=2 * CAP)
    whole = set(corpus.names) - {corpus.meta["truncated"]}
    assert whole < set(larger.names)
    split_small = dict(zip(corpus.names, corpus.is_val))
    split_large = dict(zip(larger.names, larger.is_val))
    assert all(split_small[name] == split_large[name] for name in whole)


def test_split_is_by_file_and_disjoint(corpus: text.Corpus) -> None:
    train, val = corpus.texts_of("train"), corpus.texts_of("val")
    assert train and val and len(train) + len(val) == len(corpus.names)
    val_names = {n for n, v in zip(corpus.names, corpus.is_val) if v}
    train_names = set(corpus.names) - val_names
    assert val_names and not (val_names & train_names)
    assert corpus.meta["val_files"] == len(val_names)
    assert corpus.meta["val_bytes"] == sum(len(t.encode()) for t in val)
    other = stdlib_corpus(max_bytes=CAP, val_fraction=0.5)
    assert other.meta["val_files"] > corpus.meta["val_files"]
    with pytest.raises(ValueError, match="split"):
        corpus.texts_of("test")


def test_split_keeps_both_sides_nonempty(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.txt": "alpha\n", "b.txt": "beta\n"})
    for fraction in (1e-9, 1 - 1e-9):
        c = files_corpus(tmp_path, val_fraction=fraction)
        assert sorted(c.is_val) == [False, True]
    assert not any(files_corpus(tmp_path, val_fraction=0.0).is_val)
    with pytest.raises(ValueError, match="at least two files"):
        files_corpus(tmp_path / "a.txt", val_fraction=0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        files_corpus(tmp_path, val_fraction=1.0)


def test_user_files_from_a_directory_a_list_and_bad_input(tmp_path: Path) -> None:
    root = write_files(tmp_path / "docs", {"a.txt": "first file\n", "sub/b.txt": "second é file\n",
                                           "c.md": "not matched\n", "blank.txt": "  \n"})
    c = files_corpus(root, val_fraction=0.0)
    assert c.names == ("a.txt", "sub/b.txt") and c.texts[1] == "second é file\n"
    assert files_corpus(root, "**/*.md", val_fraction=0.0).names == ("c.md",)
    listed = files_corpus([root / "sub/b.txt", root / "a.txt"], val_fraction=0.0)
    assert listed.names == c.names and listed.content_hash == c.content_hash
    write_files(tmp_path / "bad", {"latin.txt": "caf\xe9\n".encode("latin-1"), "ok.txt": "fine\n"})
    with pytest.raises(ValueError, match="latin.txt is not valid utf-8"):
        files_corpus(tmp_path / "bad")
    assert files_corpus(tmp_path / "bad", encoding="latin-1", val_fraction=0.0).texts[0] == "café\n"
    with pytest.raises(ValueError, match="not a file"):
        files_corpus([root / "missing.txt"])
    with pytest.raises(ValueError, match="no file"):
        files_corpus(root, "*.rst")
    with pytest.raises(ValueError, match="empty corpus"):
        files_corpus([root / "blank.txt"], val_fraction=0.0)


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("hidden\n")
    real = Path.read_bytes

    def refuse(self: Path) -> bytes:
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod 0 does not stop root, who may run the suite
    with pytest.raises(ValueError, match="cannot read .*secret.txt: Permission denied"):
        files_corpus([path], val_fraction=0.0)


# ------------------------------------------------------------------------------------------------------- tokenizers


def test_byte_round_trip_and_stream() -> None:
    tok = ByteTokenizer()
    sample = "def f(x):\n\treturn x ** 2  # é, ∑, 🐍\n"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.vocab_size == 256 and max(tok.encode(sample)) > 127
    stream = tok.encode_documents(["ab", "c"])
    assert stream.dtype == torch.int64 and stream.tolist() == [97, 98, 0, 99, 0]


def test_bpe_is_deterministic_lossless_and_separates_documents(corpus: text.Corpus) -> None:
    train = corpus.texts_of("train")
    first, second = train_bpe(train, VOCAB), train_bpe(train, VOCAB, parallel=True)
    assert first.to_json() == second.to_json()
    assert first.vocab_size == VOCAB and first.eos_id == first.backend.token_to_id(text.EOS_TOKEN)
    sample = train[0] + "ünïcode ∑ 🐍\r\n\tend"
    assert first.decode(first.encode(sample)) == sample
    tokens = sum(len(first.encode(t)) for t in train)
    assert tokens < 0.6 * sum(len(t.encode()) for t in train)  # merges compress the source (≈ 0.5 at V = 400)
    stream = first.encode_documents(train[:3])
    assert int((stream == first.eos_id).sum()) == 3 and int(stream[-1]) == first.eos_id
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(train, 200)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(["", "  \n"], VOCAB)


def test_tokenize_corpus_is_deterministic_without_cache(corpus: text.Corpus) -> None:
    a = tokenize_corpus(corpus, "bpe", VOCAB, use_cache=False)
    b = tokenize_corpus(corpus, "bpe", VOCAB, use_cache=False)
    assert a.cache_path is None and not a.cache_hit
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.val_ids, b.val_ids)
    assert a.train_ids.dtype == torch.int64 and int(a.train_ids.max()) < a.vocab_size
    assert a.meta["train_tokens"] == a.train_ids.numel() and a.meta["val_tokens"] == a.val_ids.numel()
    assert int((a.val_ids == a.tokenizer.eos_id).sum()) == corpus.meta["val_files"]
    assert a.tokenizer.decode(a.val_ids.tolist()).split(text.EOS_TOKEN)[:-1] == corpus.texts_of("val")


def test_byte_corpus_ids_are_the_utf8_bytes(tmp_path: Path, corpus: text.Corpus) -> None:
    tt = tokenize_corpus(corpus, "byte", cache_dir=tmp_path)
    expected = b"".join(t.encode() + b"\0" for t in corpus.texts_of("train"))
    assert tt.vocab_size == 256 and bytes(tt.train_ids.tolist()) == expected
    assert torch.equal(tokenize_corpus(corpus, "byte", cache_dir=tmp_path).train_ids, tt.train_ids)
    with pytest.raises(ValueError, match="vocab_size 256"):
        tokenize_corpus(corpus, "byte", 1000, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'bpe' or 'byte'"):
        tokenize_corpus(corpus, "chars", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------------ cache


def test_second_load_hits_the_cache_without_training(tmp_path: Path, corpus: text.Corpus,
                                                     bpe_calls: list[int]) -> None:
    messages: list[str] = []
    first = tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path, progress=messages.append)
    assert len(bpe_calls) == 1 and not first.cache_hit
    assert first.cache_path is not None and first.cache_path.parent == tmp_path / "text"
    assert first.cache_path.name == f"{first.meta['key']}.pt"
    assert any(m.startswith("training BPE") for m in messages) and any(m.startswith("cached") for m in messages)
    mtime = first.cache_path.stat().st_mtime_ns
    second = tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path, progress=messages.append)
    assert len(bpe_calls) == 1 and second.cache_hit and messages[-1].startswith("cache hit")
    assert first.cache_path.stat().st_mtime_ns == mtime
    assert torch.equal(first.train_ids, second.train_ids) and torch.equal(first.val_ids, second.val_ids)
    assert second.tokenizer.to_json() == first.tokenizer.to_json()
    assert second.train_ids.dtype == torch.int64
    assert [p.name for p in (tmp_path / "text").iterdir()] == [first.cache_path.name]  # no temporary left over


def test_cache_key_follows_settings_and_content(tmp_path: Path, corpus: text.Corpus, bpe_calls: list[int]) -> None:
    base = tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path)
    other_vocab = tokenize_corpus(corpus, "bpe", VOCAB + 50, cache_dir=tmp_path)
    other_split = tokenize_corpus(stdlib_corpus(max_bytes=CAP, val_fraction=0.3), "bpe", VOCAB, cache_dir=tmp_path)
    keys = {base.meta["key"], other_vocab.meta["key"], other_split.meta["key"]}
    assert len(keys) == 3 and len(bpe_calls) == 3 and not other_vocab.cache_hit and not other_split.cache_hit


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_a_corrupt_cache_entry_is_rebuilt(tmp_path: Path, corpus: text.Corpus, bpe_calls: list[int],
                                          damage: str) -> None:
    first = tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path)
    path = first.cache_path
    assert path is not None
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"format": 1, "key": "someone else's"}, path)
    messages: list[str] = []
    rebuilt = tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path, progress=messages.append)
    assert not rebuilt.cache_hit and len(bpe_calls) == 2 and any("rebuilding" in m for m in messages)
    assert torch.equal(rebuilt.train_ids, first.train_ids)
    assert tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path).cache_hit and len(bpe_calls) == 2


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SAFESTEP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "safestep"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "safestep"
    monkeypatch.setenv("SAFESTEP_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_user_files_go_through_the_same_cache(tmp_path: Path, bpe_calls: list[int]) -> None:
    root = write_files(tmp_path / "notes", {f"n{i}.txt": f"note {i}: " + "the quick brown fox " * (i + 3) + "\n"
                                            for i in range(6)})
    first = tokenize_corpus(files_corpus(root, val_fraction=0.3), "bpe", 300, cache_dir=tmp_path / "cache")
    again = tokenize_corpus(files_corpus(root, val_fraction=0.3), "bpe", 300, cache_dir=tmp_path / "cache")
    assert again.cache_hit and len(bpe_calls) == 1 and torch.equal(first.train_ids, again.train_ids)
    assert first.meta["source"] == "files" and first.val_ids.numel() > 0


def test_library_code_does_not_print(tmp_path: Path, corpus: text.Corpus, capsys: pytest.CaptureFixture) -> None:
    tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path)
    tokenize_corpus(corpus, "bpe", VOCAB, cache_dir=tmp_path)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# ---------------------------------------------------------------------------------------------------------- batches


def test_windows_shift_and_pad_the_ragged_end() -> None:
    ids = torch.arange(10, 20)
    w = make_windows(ids, 4, pad_id=-1)
    assert w.inputs.dtype == w.labels.dtype == torch.int64 and w.inputs.shape == (3, 4) and len(w) == 3
    assert w.inputs.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, -1, -1]]
    assert w.labels.tolist() == [[11, 12, 13, 14], [15, 16, 17, 18], [19, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    dropped = make_windows(ids, 4, drop_last=True)
    assert dropped.inputs.tolist() == w.inputs[:2].tolist() and dropped.labels.tolist() == w.labels[:2].tolist()
    overlapping = make_windows(ids, 4, stride=2, drop_last=True)
    assert overlapping.inputs[:, 0].tolist() == [10, 12, 14]
    exact = make_windows(torch.arange(9), 4)  # 8 labels fill two windows: no padded window
    assert len(exact) == 2 and not (exact.labels == IGNORE_INDEX).any()
    spaced = make_windows(torch.arange(1000), 10, max_windows=5)
    assert spaced.inputs[:, 0].tolist() == [0, 250, 500, 740, 990]
    batches = list(w.batches(2))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        make_windows(torch.tensor([3]), 4)
    with pytest.raises(ValueError, match="integer"):
        make_windows(torch.zeros(10), 4)


def test_sampler_is_seeded_resumable_and_in_bounds() -> None:
    ids = torch.arange(500)
    sampler = WindowSampler(ids, seq_len=16, batch_size=8, seed=3)
    x, y = sampler.batch(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # labels are the next ids
    assert int(y.max()) <= 499 and not (y == IGNORE_INDEX).any()
    again = WindowSampler(ids, 16, 8, seed=3)
    assert torch.equal(again.batch(5)[0], x)
    stream = iter(again)
    first_six = [next(stream)[0] for _ in range(6)]
    assert torch.equal(first_six[5], x) and not torch.equal(first_six[4], x)
    assert not torch.equal(WindowSampler(ids, 16, 8, seed=4).batch(5)[0], x)
    with pytest.raises(ValueError, match="at least 17 tokens"):
        WindowSampler(torch.arange(16), 16, 2)


def test_tokenized_text_batches(tmp_path: Path, corpus: text.Corpus) -> None:
    tt = tokenize_corpus(corpus, "byte", cache_dir=tmp_path)
    x, y = tt.sampler(batch_size=4, seq_len=32, seed=0).batch(0)
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    val = tt.validation(seq_len=32)
    covered = int((val.labels != IGNORE_INDEX).sum())
    assert covered == tt.val_ids.numel() - 1  # every validation token but the first is predicted exactly once
    assert (val.inputs[-1][val.labels[-1] == IGNORE_INDEX] == tt.tokenizer.eos_id).all()
    assert len(tt.validation(seq_len=32, max_windows=7)) == 7


def test_an_unwritable_cache_is_reported_not_fatal(tmp_path: Path, corpus: text.Corpus) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("a file where the cache directory should be\n")
    messages: list[str] = []
    tt = tokenize_corpus(corpus, "byte", cache_dir=blocker, progress=messages.append)
    assert tt.train_ids.numel() == corpus.meta["train_bytes"] + corpus.meta["train_files"]
    assert not tt.cache_hit and messages[-1].startswith("cache not written")
