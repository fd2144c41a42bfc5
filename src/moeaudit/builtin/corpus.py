"""Built-in, offline corpus for the embedded ``builtin:tiny-moe`` model (``moeaudit.corpus`` source ``builtin``).

Choice
------
A deterministic mix of five domains, built by code on the fly (nothing third-party is committed):

``docs``
    Real English: the CPython reference-manual topics that every Python installation carries in
    ``pydoc_data.topics.topics`` (79 topics on CPython 3.11, ~465k characters), split at paragraph
    boundaries into chunks of at most ~2,000 characters.  **Training split only**: the exact text of
    these topics changes between Python releases, so they are kept out of the held-out split to keep
    that split byte-identical everywhere.  A diagnostic split ``heldout_docs`` (topics whose name has
    ``zlib.crc32(name) % 10 == 0``, excluded from ``train``) is available but is version dependent.
``prose``
    Templated English about a small world of people, places, jobs and objects.  Facts stated early in
    a document (where someone lives, what they own) are repeated and queried later, so the model can
    learn in-context recall.
``code``
    Small Python functions with consistent naming, docstrings, loops, conditionals and a test line.
``arithmetic``
    Lines such as ``17 + 25 = 42`` (addition, subtraction, multiplication; results always correct).
``records``
    Structured records with a fixed schema: CSV tables and JSON lines (id, name, city, age, score, email).

The four generated domains use ``random.Random`` with integer seeds derived from (split, domain,
document index); the generator only uses ``random()``, ``randint``/``randrange``, ``choice`` and
``sample``, whose output is stable across CPython 3.10-3.13, so the generated text is identical on every
supported Python.

Split (fixed)
-------------
``train``
    ``TRAIN_DOCS_PER_DOMAIN`` (= 1000) generated documents per generated domain (seed namespace 1) plus every
    ``docs`` chunk whose topic is not in ``heldout_docs``.
``heldout``
    ``HELDOUT_DOCS_PER_DOMAIN`` (= 16) generated documents per generated domain from a separate seed
    namespace (2).  Generated only, so byte-identical on every Python version; disjoint from ``train``
    (checked by the tests).  Kept small on purpose so a full ablation audit of the embedded model over it
    runs in well under two minutes on two CPU cores.
``heldout_docs``
    Diagnostic only: the ~10% of ``docs`` topics held out of training (Python-version dependent).

Sizes (CPython 3.11; token counts with the embedded tiny-moe byte-level BPE tokenizer, vocab 4096)
-----------------------------------------------------------------------------------------------------
Per-domain numbers are in the model card (``tiny-moe/README.md``) and ``tiny-moe/eval.json``.

``train``: 4,268 documents (268 ``docs`` chunks + 4 x 1,000 generated), 2,950,163 characters, 900,928 tokens
(``docs`` varies a little with the Python version: 4,265 documents on 3.10, 4,293 on 3.13).
``heldout``: 64 documents (4 x 16), 39,360 characters, 12,342 tokens (incl. one ``<|endoftext|>`` per document),
identical on 3.10-3.13.  Building ``train`` takes ~0.1 s, ``heldout`` a few milliseconds.
"""

from __future__ import annotations

import random
import zlib

from moeaudit.builtin._generate import GENERATORS as _GENERATORS

__all__ = [
    "DOMAINS",
    "GENERATED_DOMAINS",
    "SPLITS",
    "TRAIN_DOCS_PER_DOMAIN",
    "HELDOUT_DOCS_PER_DOMAIN",
    "build_documents",
    "build_labelled_documents",
]

DOMAINS: tuple[str, ...] = ("docs", "prose", "code", "arithmetic", "records")
GENERATED_DOMAINS: tuple[str, ...] = ("prose", "code", "arithmetic", "records")
SPLITS: tuple[str, ...] = ("train", "heldout", "heldout_docs")

TRAIN_DOCS_PER_DOMAIN = 1000
HELDOUT_DOCS_PER_DOMAIN = 16
_SPLIT_NAMESPACE = {"train": 1, "heldout": 2}
_MAX_DOC_CHUNK = 2000

def _seed(split: str, domain: str, index: int) -> int:
    return _SPLIT_NAMESPACE[split] * 10_000_000 + GENERATED_DOMAINS.index(domain) * 1_000_000 + index


def _generated(split: str, n: int) -> list[tuple[str, str]]:
    out = []
    for domain in GENERATED_DOMAINS:
        gen = _GENERATORS[domain]
        for i in range(n):
            out.append((domain, gen(random.Random(_seed(split, domain, i)))))
    return out


def _chunk(text: str, limit: int = _MAX_DOC_CHUNK) -> list[str]:
    chunks: list[str] = []
    cur = ""
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if cur and len(cur) + len(para) + 2 > limit:
            chunks.append(cur + "\n")
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > limit:  # a single huge paragraph: hard split on a line boundary
            cut = cur.rfind("\n", 0, limit)
            cut = cut if cut > 0 else limit
            chunks.append(cur[:cut].rstrip("\n") + "\n")
            cur = cur[cut:].lstrip("\n")
    if cur.strip():
        chunks.append(cur + "\n")
    return chunks


def _is_heldout_topic(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10 == 0


def _docs(heldout: bool) -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped-down Python builds
        return []
    out = []
    for name in sorted(topics):
        if _is_heldout_topic(name) != heldout:
            continue
        out.extend(("docs", c) for c in _chunk(str(topics[name]).replace("\r\n", "\n")))
    return out


def build_labelled_documents(split: str) -> list[tuple[str, str]]:
    """Return ``[(domain, text), ...]`` for ``split`` in a fixed order (see the module docstring)."""
    if split == "train":
        return _docs(heldout=False) + _generated("train", TRAIN_DOCS_PER_DOMAIN)
    if split == "heldout":
        return _generated("heldout", HELDOUT_DOCS_PER_DOMAIN)
    if split == "heldout_docs":
        return _docs(heldout=True)
    raise ValueError(f"unknown builtin corpus split {split!r}; valid splits: {', '.join(SPLITS)}")


def build_documents(split: str) -> list[str]:
    """Return the documents (plain strings) of the built-in corpus ``split`` ("train", "heldout", "heldout_docs")."""
    return [text for _, text in build_labelled_documents(split)]
