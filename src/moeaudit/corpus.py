"""Corpora for audits: read documents from a source, tokenise them unpadded, and list valid loss positions.

Sources:

- ``wikitext-2``: the test split of ``wikitext-2-raw-v1`` through the ``datasets`` library (the paper's corpus);
  documents are its articles (split at top-level `` = Title = `` headings).
- ``builtin`` (= ``builtin:heldout``) and ``builtin:train``: the corpus shipped with moeaudit, built by code.
- a local ``.txt`` file (one document per blank-line-separated block), ``.jsonl`` or ``.parquet`` (a text field);
  text files are decoded with ``encoding`` (UTF-8 unless told), and one that does not decode is refused naming the
  file, the offending byte and the fix.

Reading documents needs neither torch nor a tokenizer, so a run checks its corpus before it loads anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moeaudit.errors import CorpusError, did_you_mean

if TYPE_CHECKING:
    import torch

NAMED_SOURCES: tuple[str, ...] = ("wikitext-2", "builtin", "builtin:heldout", "builtin:train")
FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")
#: The hub dataset behind ``wikitext-2``.
WIKITEXT_REPO = "Salesforce/wikitext"
_HEADING = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class CorpusSequence:
    """One tokenised, unpadded document.

    Attributes:
        seq_id: Index of the sequence in the loaded corpus (0..n-1).
        doc_index: Index of the document in its source.
        input_ids: [T] token ids, truncated to ``max_length``.
    """

    seq_id: int
    doc_index: int
    input_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def wikitext_articles(lines: Sequence[str]) -> list[str]:
    """Group WikiText lines into articles: a new article starts at each top-level `` = Title = `` heading."""
    articles: list[list[str]] = []
    for line in lines:
        if _HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a).strip() for a in articles if "".join(a).strip()]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (one request, no retries); ``False`` at once
    under ``HF_HUB_OFFLINE``."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_hf_file_metadata(hf_hub_url(WIKITEXT_REPO, "README.md", repo_type="dataset"), timeout=timeout,
                             retry_on_errors=False)
    except HfHubHTTPError:  # it answered (a 4xx / 5xx): reachable
        return True
    except Exception:  # connection refused, DNS failure, timeout, proxy error
        return False
    return True


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Make the datasets library read its cache only (no retries against an unreachable hub) for the block."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _read_wikitext() -> list[str]:
    online = hub_reachable()  # one 3-second probe instead of the datasets library's retries (27 s offline)
    try:
        import datasets

        with nullcontext() if online else _hub_offline():
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # offline, no cache, hub unreachable
        reason = ("the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and the datasets cache does not "
                  "hold it" if not online else f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        raise CorpusError(
            f"could not load wikitext-2 (wikitext-2-raw-v1, test split) through the datasets library: {reason}. "
            "On a connected machine run "
            "`python -c \"import datasets; datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', "
            "split='test').to_parquet('wikitext2-test.parquet')\"` and pass the file as the corpus "
            "(--corpus wikitext2-test.parquet); parquet rows that are WikiText lines are regrouped into articles."
        ) from exc
    return wikitext_articles(list(data["text"]))


def _read_text(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192] and not encoding.lower().replace("_", "-").startswith("utf-16"):
        raise CorpusError(f"corpus file {str(path)!r} holds NUL bytes, so it is binary, not text; pass a .txt / "
                          ".jsonl text file (or a .parquet file with a text column).")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CorpusError(f"corpus file {str(path)!r} is not valid {encoding} (byte 0x{data[exc.start]:02x} on line "
                          f"{line}); pass encoding= naming the file's encoding (e.g. latin-1, cp1252) or convert "
                          "it to UTF-8.") from None


def _read_file(path: Path, text_field: str, encoding: str = "utf-8") -> list[str]:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CorpusError(f"corpus file {str(path)!r} {what}. Pass an existing .txt, .jsonl or .parquet "
                          f"file, or one of: {', '.join(NAMED_SOURCES)}.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_text(path, encoding)
        docs = [block.strip() for block in re.split(r"\n\s*\n", text)]
    elif suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(_read_text(path, encoding).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"corpus file {str(path)!r} line {lineno} is not valid JSON ({exc.msg}); fix "
                                  "the line or remove it.") from None
            if not isinstance(row, dict) or text_field not in row:
                raise CorpusError(f"corpus file {str(path)!r} line {lineno} has no {text_field!r} field; pass "
                                  "text_field= to name the field that holds the text.")
            if not isinstance(row[text_field], str):
                raise CorpusError(f"corpus file {str(path)!r} line {lineno}: field {text_field!r} holds "
                                  f"{json.dumps(row[text_field])[:40]}, not a string; give every line's "
                                  f"{text_field!r} as text (or pass text_field= naming the field that holds it).")
            docs.append(row[text_field])
    elif suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow's ArrowInvalid / OSError for a damaged or non-Parquet file
            raise CorpusError(f"corpus file {str(path)!r} is not a readable Parquet file "
                              f"({str(exc).splitlines()[0][:160]}); pass an intact .parquet file.") from None
        if text_field not in frame.columns:
            raise CorpusError(f"corpus file {str(path)!r} has no {text_field!r} column (columns: "
                              f"{', '.join(map(str, frame.columns))}); pass text_field= to name the text column.")
        texts = frame[text_field].tolist()
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise CorpusError(f"corpus file {str(path)!r}: column {text_field!r} holds {len(bad)} value(s) that are "
                              f"not strings (row {bad[0]}: {texts[bad[0]]!r}); drop or fill those rows, or pass "
                              "text_field= naming the text column.")
        docs = texts
        if docs and sum(bool(_HEADING.match(d.rstrip("\n"))) for d in docs) > 1:
            docs = wikitext_articles(docs)  # a WikiText export: one row per line
    else:
        raise CorpusError(f"corpus file {str(path)!r} has an unsupported suffix {suffix!r}; supported: "
                          f"{', '.join(FILE_SUFFIXES)}.")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"corpus file {str(path)!r} holds no text (empty, or only blank documents).")
    return docs


def read_documents(source: str | Path, *, text_field: str = "text", encoding: str = "utf-8") -> list[str]:
    """The documents of ``source`` in their source order (see module docstring for the sources)."""
    name = str(source)
    if name == "wikitext-2":
        return _read_wikitext()
    if name in ("builtin", "builtin:heldout", "builtin:train"):
        from moeaudit.builtin import builtin_documents

        return builtin_documents("train" if name == "builtin:train" else "heldout")
    path = Path(name)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        return _read_file(path, text_field, encoding)
    raise CorpusError(f"unknown corpus source {name!r}; valid: {', '.join(NAMED_SOURCES)}, or a path to a "
                      f"{', '.join(FILE_SUFFIXES)} file.{did_you_mean(name, NAMED_SOURCES)}")


def read_domains(source: str | Path, *, domain_field: str | None = None, text_field: str = "text",
                 encoding: str = "utf-8") -> list[str] | None:
    """The domain label of each document of ``source``, aligned with :func:`read_documents` (``None`` when the
    corpus carries none): the built-in corpus's own domains (prose, code, arithmetic, records), or the
    ``domain_field`` of each ``.jsonl`` row / ``.parquet`` row.

    Raises:
        CorpusError: ``domain_field`` given for a corpus that has no fields (``.txt``, wikitext-2, the built-in
            corpus), or missing from a row.
    """
    name = str(source)
    if name in ("builtin", "builtin:heldout", "builtin:train"):
        if domain_field is not None:
            raise CorpusError(f"domain_field={domain_field!r}: the built-in corpus labels its own domains; leave "
                              "domain_field unset (it names a field of a .jsonl / .parquet corpus).")
        from moeaudit.builtin import builtin_labelled_documents

        return [d for d, _ in builtin_labelled_documents("train" if name == "builtin:train" else "heldout")]
    if domain_field is None:
        return None
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise CorpusError(f"domain_field={domain_field!r} names a field, but the corpus {name!r} has none; "
                          "domain labels come from a .jsonl or .parquet corpus (or the built-in corpus). Leave "
                          "domain_field unset.")
    if suffix == ".jsonl":
        pairs = []
        for lineno, line in enumerate(_read_text(path, encoding).splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)  # read_documents has already refused a line that is not JSON
            if domain_field not in row:
                raise CorpusError(f"corpus file {name!r} line {lineno} has no {domain_field!r} field; every row "
                                  "needs a domain label with domain_field= (or leave it unset).")
            pairs.append((str(row.get(text_field, "")), str(row[domain_field])))
    else:
        import pandas as pd

        frame = pd.read_parquet(path)
        if domain_field not in frame.columns:
            raise CorpusError(f"corpus file {name!r} has no {domain_field!r} column (columns: "
                              f"{', '.join(map(str, frame.columns))}); pass domain_field= naming the domain column.")
        texts = [str(t) for t in frame[text_field].tolist()]
        if texts and sum(bool(_HEADING.match(d.rstrip("\n"))) for d in texts) > 1:
            raise CorpusError(f"corpus file {name!r} is a WikiText export (one row per line, regrouped into "
                              "articles), so its rows carry no per-document domain; leave domain_field unset.")
        pairs = list(zip(texts, [str(d) for d in frame[domain_field].tolist()]))
    return [d for t, d in pairs if t.strip()]


def load_corpus(
    source: str | Path,
    tokenizer,
    *,
    n_samples: int | None = None,
    max_length: int = 512,
    min_length: int = 32,
    text_field: str = "text",
    encoding: str = "utf-8",
    shuffle_seed: int | None = None,
    add_special_tokens: bool = True,
    documents: Sequence[str] | None = None,
) -> list[CorpusSequence]:
    """Tokenise documents of ``source`` into unpadded sequences.

    Args:
        source: ``wikitext-2``, ``builtin``, ``builtin:train`` or a ``.txt`` / ``.jsonl`` / ``.parquet`` path.
        tokenizer (PreTrainedTokenizerBase): A transformers tokenizer.
        n_samples: Keep the first ``n_samples`` documents that pass the length filter (all when ``None``).
        max_length: Truncate each sequence to this many tokens (the paper: 512).
        min_length: Drop documents shorter than this many tokens (after truncation).
        text_field: Field of ``.jsonl`` / ``.parquet`` rows that holds the text.
        encoding: Text encoding of ``.txt`` / ``.jsonl`` files.
        shuffle_seed: Visit documents in a seeded random order instead of source order.
        add_special_tokens: Let the tokenizer add its special tokens (BOS) as the model was trained with.
        documents: The documents of ``source`` when already read (:func:`read_documents`); ``source`` then only
            names them in messages.

    Returns:
        Sequences in a deterministic order.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too short: a next-token loss needs at least 2 tokens.")
    if min_length < 2:
        raise ValueError(f"min_length={min_length}: use at least 2 (a next-token loss needs 2 tokens).")
    if min_length > max_length:
        raise ValueError(f"min_length={min_length} exceeds max_length={max_length}; no sequence could pass.")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: ask for at least one sequence, or None for all.")
    import torch

    docs = list(documents) if documents is not None else read_documents(source, text_field=text_field,
                                                                          encoding=encoding)
    order = np.arange(len(docs))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(docs))
    sequences: list[CorpusSequence] = []
    longest = 0
    for doc_index in order.tolist():
        ids = tokenizer(docs[doc_index], add_special_tokens=add_special_tokens, truncation=True,
                        max_length=max_length)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) < min_length:
            continue
        sequences.append(CorpusSequence(len(sequences), doc_index, torch.tensor(ids, dtype=torch.long)))
        if n_samples is not None and len(sequences) == n_samples:
            break
    if not sequences:
        raise CorpusError(f"all {len(docs)} documents of {str(source)!r} are shorter than min_length={min_length} "
                          f"tokens (the longest has {longest}); lower min_length or use a larger corpus.")
    return sequences


def valid_positions(seq_len: int, min_context: int = 1) -> np.ndarray:
    """Positions of a ``seq_len``-token sequence that have a next-token loss and enough context.

    The loss at ``t`` predicts token ``t + 1`` from tokens ``0..t`` (``t + 1`` tokens of context), so ``t`` is valid
    when ``t <= seq_len - 2`` (not the last token) and ``t + 1 >= min_context``.

    Args:
        seq_len: Tokens in the sequence.
        min_context: Tokens of context a position needs, itself included (at least 1).

    Returns:
        positions (numpy.ndarray): The valid positions, ascending (int64).
    """
    if min_context < 1:
        raise ValueError(f"min_context={min_context}: at least the token itself (1) is always context.")
    return np.arange(max(min_context - 1, 0), max(seq_len - 1, 0), dtype=np.int64)
