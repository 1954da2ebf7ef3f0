"""Corpus sources: text files, folders, globs, JSONL (any of them xz-compressed: NAME.jsonl.xz), and the built-in
corpus (the Python standard library).

A corpus is a list of `Document`s in a stable order, so its content hash (and everything cached under
it) does not depend on the order the file system lists files in. The whole corpus is held in memory:
`--corpus-limit-mb` caps it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dsmoe.errors import UserError

# Extensions read when a folder is given; a file named explicitly is read whatever its extension.
TEXT_EXTENSIONS = frozenset({".txt", ".md", ".rst", ".py", ".pyi", ".jsonl", ".c", ".h", ".cc", ".cpp", ".hpp",
                             ".rs", ".go", ".java", ".js", ".ts", ".html", ".css", ".tex", ".csv", ".tsv",
                             ".json", ".yaml", ".yml", ".toml", ".sh"})
# Folders of the standard library that hold tests or third-party packages rather than library source.
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idle_test"})


@dataclass(frozen=True)
class Document:
    name: str  # where it came from (path, path:line for JSONL), for error messages
    text: str


def read_corpus(specs: list[str], text_field: str = "text") -> list[Document]:
    """Documents from files, folders (recursively, files with a text extension) or globs; `.jsonl` files
    give one document per line from `text_field`. An empty `specs` means the built-in corpus."""
    if not specs:
        return builtin_corpus()
    docs: list[Document] = []
    for spec in specs:
        for path in _expand(spec):
            docs.extend(_read_file(path, text_field))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"the corpus {' '.join(specs)} holds no text: pass files, folders or globs of non-empty "
                        "text files (or .jsonl with --text-field)")
    return docs


def builtin_corpus() -> list[Document]:
    """The running Python's standard library source (.py files; test folders and test_*.py excluded):
    ~12 MB of real code that every machine has offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test"):
                path = Path(dirpath, name)
                docs.append(Document(str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise UserError(f"no Python source found under {root} for the built-in corpus: pass --data FILES")
    return docs


def limit_corpus(docs: list[Document], max_bytes: int | None) -> list[Document]:
    """A deterministic subset of at most max_bytes of text, chosen in content-hash order (a spread of the
    corpus, not its alphabetically first files), kept in corpus order."""
    if max_bytes is None or sum(len(d.text.encode()) for d in docs) <= max_bytes:
        return docs
    chosen, total = set(), 0
    for i in sorted(range(len(docs)), key=lambda i: _sha(docs[i].text)):
        size = len(docs[i].text.encode())
        if total + size <= max_bytes:
            chosen.add(i)
            total += size
    if not chosen:  # every document is longer than the cap: keep the head of the first
        head = docs[0].text.encode()[:max_bytes].decode("utf-8", errors="ignore")
        return [Document(docs[0].name, head)]
    return [d for i, d in enumerate(docs) if i in chosen]


def corpus_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        data = doc.text.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _expand(spec: str) -> list[Path]:
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in paths if p.is_file()]
        if not files:
            raise UserError(f"--data {spec}: the pattern matches no files; check the path and quote the glob")
        return files
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS)
        if not files:
            raise UserError(f"--data {spec}: the folder holds no text files ({', '.join(sorted(TEXT_EXTENSIONS)[:6])}"
                            ", ...); pass another folder or the files themselves")
        return files
    raise UserError(f"--data {spec}: no such file or folder; check the path")


def jsonl_records(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a line that is not JSON is named
    with its number."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix the line or remove it") from None


def _read_file(path: Path, text_field: str) -> list[Document]:
    compressed = path.suffix.lower() == ".xz"
    try:
        raw = lzma.decompress(path.read_bytes()) if compressed else path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    except lzma.LZMAError as e:
        raise UserError(f"{path} is not a valid xz file ({e}); pass it uncompressed or recompress it") from None
    if b"\0" in raw[:8192]:
        raise UserError(f"{path} looks binary (NUL bytes); pass text files only")
    text = raw.decode("utf-8", errors="replace")
    if Path(path.stem if compressed else path.name).suffix.lower() != ".jsonl":
        return [Document(str(path), text)]
    docs = []
    for lineno, record in jsonl_records(path, text.split("\n")):  # not splitlines(): U+2028 occurs in strings
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}:{lineno} has no string field {text_field!r} (has: {keys}); pass "
                            "--text-field NAME")
        docs.append(Document(f"{path}:{lineno}", value))
    return docs
