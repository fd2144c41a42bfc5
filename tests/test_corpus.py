"""Corpus sources, truncation, filters, deterministic order, valid positions, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moeaudit.builtin import builtin_model_path
from moeaudit.corpus import load_corpus, read_documents, valid_positions, wikitext_articles
from moeaudit.errors import CorpusError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_path("tiny-moe"))


DOCS = ["alpha beta gamma delta " * 10, "short", "one two three four five six seven eight nine ten " * 3]


def test_txt_jsonl_parquet_give_the_same_documents(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS) + "\n\n\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)))
    pd.DataFrame({"text": DOCS}).to_parquet(tmp_path / "c.parquet")
    loaded = [load_corpus(tmp_path / f"c.{ext}", tokenizer, min_length=8) for ext in ("txt", "jsonl", "parquet")]
    for seqs in loaded:
        assert [s.doc_index for s in seqs] == [0, 2]  # "short" is filtered out
        assert [s.seq_id for s in seqs] == [0, 1]
    for a, b in zip(loaded[1], loaded[2]):
        assert a.input_ids.tolist() == b.input_ids.tolist()
    assert loaded[1][0].input_ids.tolist() == tokenizer(DOCS[0])["input_ids"]
    assert loaded[0][0].input_ids.tolist() == tokenizer(DOCS[0].strip())["input_ids"]  # .txt blocks are stripped
    assert loaded[0][0].input_ids.dim() == 1  # unpadded 1-D


def test_truncation_sample_count_and_seeded_order(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("\n\n".join(f"document number {i} " * 20 for i in range(10)))
    seqs = load_corpus(tmp_path / "c.txt", tokenizer, max_length=16, min_length=4, n_samples=3)
    assert len(seqs) == 3 and all(len(s) == 16 for s in seqs)
    a = load_corpus(tmp_path / "c.txt", tokenizer, shuffle_seed=1, min_length=4)
    b = load_corpus(tmp_path / "c.txt", tokenizer, shuffle_seed=1, min_length=4)
    assert [s.doc_index for s in a] == [s.doc_index for s in b] != list(range(10))


def test_builtin_source(tokenizer):
    seqs = load_corpus("builtin", tokenizer, n_samples=5)
    assert len(seqs) == 5 and all(32 <= len(s) <= 512 for s in seqs)
    assert read_documents("builtin") != read_documents("builtin:train")


def test_wikitext_articles_and_parquet_export(tmp_path):
    lines = [" = Alpha = \n", " text a \n", " = = Sub = = \n", " more a \n", " = Beta = \n", " text b \n"]
    assert wikitext_articles(lines) == ["= Alpha = \n text a \n = = Sub = = \n more a", "= Beta = \n text b"]
    pd.DataFrame({"text": lines}).to_parquet(tmp_path / "w.parquet")
    assert len(read_documents(tmp_path / "w.parquet")) == 2


def test_wikitext_offline_message(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match="could not load wikitext-2.*to_parquet.*--corpus wikitext2-test.parquet"):
        read_documents("wikitext-2")


def test_bad_sources(tmp_path, tokenizer):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt", tokenizer)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="holds no text"):
        load_corpus(tmp_path / "empty.txt", tokenizer)
    with pytest.raises(CorpusError, match="unknown corpus source 'wikitext2'.*Did you mean 'wikitext-2'"):
        load_corpus("wikitext2", tokenizer)
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="unsupported suffix '.csv'"):
        load_corpus(tmp_path / "c.csv", tokenizer)
    (tmp_path / "s.txt").write_text("tiny\n\nsmall doc")
    with pytest.raises(CorpusError, match="all 2 documents.*shorter than min_length=32.*lower min_length"):
        load_corpus(tmp_path / "s.txt", tokenizer)
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="no 'text' field"):
        load_corpus(tmp_path / "b.jsonl", tokenizer)
    with pytest.raises(ValueError, match="exceeds max_length"):
        load_corpus("builtin", tokenizer, min_length=64, max_length=32)


def test_valid_positions():
    np.testing.assert_array_equal(valid_positions(5), [0, 1, 2, 3])
    np.testing.assert_array_equal(valid_positions(5, min_context=3), [2, 3])
    assert len(valid_positions(1)) == 0
    with pytest.raises(ValueError, match="min_context=0"):
        valid_positions(5, min_context=0)
