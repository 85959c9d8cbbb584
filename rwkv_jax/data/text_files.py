"""Finding and reading local text documents, and the deterministic train/validation split.

A document is one `.txt`/`.md`/`.py` file, or one line of a `.jsonl` file (its `text` field).
The split is a hash of the document key (the path relative to its input, plus `#line` for
jsonl), so it never depends on file order, machine or Python version.
"""

import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator

SUFFIXES = (".txt", ".md", ".py", ".jsonl")
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages", "dist-packages", "__pycache__"})
_SURROGATE_ESCAPES = re.compile("[\udc80-\udcff]")


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str  # Absolute path.
    rel: str  # Path relative to the input it was found under: the document key.


@dataclasses.dataclass
class ReadStats:
    """What the build log reports: documents, empty documents, non-UTF-8 bytes replaced."""
    documents: int = 0
    empty: int = 0
    invalid_bytes: int = 0
    files_with_invalid_bytes: int = 0


def stdlib_root() -> str:
    """The standard library folder of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str = "") -> list[SourceFile]:
    """All `.py` files under the stdlib `root`, without test folders and site-packages."""
    root = os.path.abspath(root or stdlib_root())
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Standard library folder {root!r} does not exist (config.data.stdlib_root).")
    files = _walk(root, (".py",), STDLIB_EXCLUDED_DIRS)
    if not files:
        raise ValueError(f"No .py files under {root!r}: the embedded corpus is empty.")
    return files


def find_text_files(spec: str, what: str = "config.data.text_files") -> list[SourceFile]:
    """Files named by a comma-separated list of files, directories and globs.

    Directories are searched recursively for the supported suffixes; files and glob matches
    are taken as given. A missing path, a glob matching nothing or an empty list is an error, naming
    `what` (the config field or flag that gave `spec`).
    """
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{what} is empty: give files, directories or globs "
                         "(comma-separated), e.g. text_files='~/corpus/*.txt'.")
    files = {}
    for item in items:
        item = os.path.expanduser(item)
        if glob.has_magic(item):
            base = os.path.abspath(_glob_base(item))
            matches = sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"{what}: the glob {item!r} matches no file.")
            found = [SourceFile(os.path.abspath(m), os.path.relpath(os.path.abspath(m), base)) for m in matches]
        elif os.path.isdir(item):
            found = _walk(os.path.abspath(item), SUFFIXES, frozenset())
            if not found:
                raise ValueError(f'{what}: no {"/".join(SUFFIXES)} files in {item!r}.')
        elif os.path.isfile(item):
            found = [SourceFile(os.path.abspath(item), os.path.basename(item))]
        else:
            raise FileNotFoundError(f"{what}: {item!r} does not exist.")
        for f in found:
            files.setdefault(f.path, f)
    return sorted(files.values(), key=lambda f: (f.rel, f.path))


def split_of(key: str, validation_fraction: float) -> str:
    """'validation' for a stable pseudo-random `validation_fraction` of keys, else 'train'."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return "validation" if h < validation_fraction * 2.0**64 else "train"


def decode_utf8(data: bytes, stats: ReadStats) -> str:
    """UTF-8 text with every invalid byte replaced by U+FFFD and counted in `stats`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text, n = _SURROGATE_ESCAPES.subn("\ufffd", data.decode("utf-8", "surrogateescape"))
        stats.invalid_bytes += n
        stats.files_with_invalid_bytes += 1
        return text


def read_documents(f: SourceFile, stats: ReadStats) -> Iterator[tuple[str, str]]:
    """(key, text) of each non-empty document in `f`; empty ones are counted and skipped."""
    with open(f.path, "rb") as fh:
        text = decode_utf8(fh.read(), stats)
    if f.path.endswith(".jsonl"):
        docs = _jsonl_documents(f, text)
    else:
        docs = [(f.rel, text)]
    for key, doc in docs:
        if doc.strip():
            stats.documents += 1
            yield key, doc
        else:
            stats.empty += 1


def fingerprint(files: list[SourceFile], *extra) -> str:
    """Short hash of the file set (paths, sizes, mtimes) and options: the dataset identity."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for f in files:
        st = os.stat(f.path)
        h.update(f"{f.path}\0{f.rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def jsonl_records(name, text: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-blank line; a ValueError naming `name`:line otherwise."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{lineno}: not valid JSON ({e}).") from e


def _jsonl_documents(f: SourceFile, text: str) -> list[tuple[str, str]]:
    docs = []
    for lineno, record in jsonl_records(f.path, text):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{f.path}:{lineno}: a .jsonl line must be an object with a string "text" field.')
        docs.append((f"{f.rel}#{lineno}", record["text"]))
    return docs


def _walk(root: str, suffixes: tuple[str, ...], excluded: frozenset[str]) -> list[SourceFile]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in excluded)
        for name in sorted(filenames):
            if name.endswith(suffixes):
                path = os.path.join(dirpath, name)
                if os.path.isfile(path):
                    files.append(SourceFile(path, os.path.relpath(path, root)))
    return files


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = pattern.split(os.sep)
    i = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return os.sep.join(parts[:i]) or ("/" if pattern.startswith(os.sep) else ".")
