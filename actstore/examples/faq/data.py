"""The FAQ study's data: question/answer pairs (a JSONL file, or offline pairs from the stdlib's docstrings) and the split."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_STDLIB_MODULES", "Pairs", "corpus", "read_pairs", "stdlib_pairs", "stratified_split"]


@dataclass
class Pairs:
    """Question/answer pairs with a group label per pair (used to stratify the split)."""

    questions: list[str]
    answers: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: Sequence[int]) -> Pairs:
        return Pairs([self.questions[i] for i in idx], [self.answers[i] for i in idx], [self.groups[i] for i in idx])


def read_pairs(path: str | os.PathLike[str], question_field: str = "question", answer_field: str = "answer",
               group_field: str | None = "source") -> Pairs:
    """Read a JSONL file of pairs (one JSON object per line); ``group_field`` may be absent (one group)."""
    qs: list[str] = []
    ans: list[str] = []
    groups: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in (question_field, answer_field) if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: no key(s) {missing}; the line has keys {sorted(row)} "
                                 "(choose others with --question-field / --answer-field)")
            q, a = row[question_field], row[answer_field]
            if not (isinstance(q, str) and isinstance(a, str)):
                raise ValueError(f"{path}:{n}: {question_field!r} and {answer_field!r} must be strings")
            if not q.strip() or not a.strip():
                continue
            qs.append(q)
            ans.append(a)
            groups.append(str(row.get(group_field, "")) if group_field else "")
    if len(qs) < 4:
        raise ValueError(f"{path}: only {len(qs)} usable pairs; need at least 4")
    return Pairs(qs, ans, groups)


#: Standard-library modules whose docstrings make the default pairs (all pure Python, present everywhere).
DEFAULT_STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "importlib", "inspect", "ipaddress",
    "json", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "pydoc", "queue", "quopri", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zipimport",
)


def _split_docstring(doc: str, max_answer_chars: int) -> tuple[str, str] | None:
    import inspect

    doc = inspect.cleandoc(doc)
    first, _, rest = doc.partition("\n")
    rest = " ".join(rest.split())
    first = first.strip()
    if len(first) < 12 or len(rest) < 40 or first.startswith((">>>", "..")):
        return None
    return first, rest[:max_answer_chars]


def stdlib_pairs(modules: Sequence[str] = DEFAULT_STDLIB_MODULES, limit: int | None = None,
                 max_answer_chars: int = 600, question: str = "summary") -> Pairs:
    """Pairs from the standard library's docstrings: first line (question) -> the rest (answer).

    With ``question="name"`` the question is instead the object's dotted name
    (``json.JSONEncoder.encode``) and the answer its whole docstring, first line
    included: a search from identifiers to descriptions, further from what the
    pretrained model learnt than summary -> body.

    Walks the public classes and functions (and their public methods) of each
    module that imports, in sorted order; the module name is the pair's group.
    Deterministic for a given Python version, and needs no download.  Each
    answer is cut to ``max_answer_chars`` characters (a batch is padded to its
    longest text, so a few long docstrings would set the cost of every batch).
    """
    import importlib
    import inspect

    if question not in ("summary", "name"):
        raise ValueError(f"question: expected 'summary' or 'name', got {question!r}")
    seen: set[str] = set()
    pairs = Pairs([], [], [])

    def add(obj: Any, group: str, dotted: str) -> None:
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        got = _split_docstring(doc, max_answer_chars) if doc else None
        if got is None or got[0] in seen or got[1] in seen:
            return
        if question == "name":
            seen.update(got)
            got = (dotted, f"{got[0]} {got[1]}"[:max_answer_chars])
        seen.update(got)
        pairs.questions.append(got[0])
        pairs.answers.append(got[1])
        pairs.groups.append(group)

    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this platform (e.g. no tkinter) is skipped
            continue
        add(module, name, name)
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != name:
                continue
            add(obj, name, f"{name}.{attr}")
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    if not meth.startswith("_") and inspect.isfunction(vars(obj)[meth]):
                        add(vars(obj)[meth], name, f"{name}.{attr}.{meth}")
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs


def stratified_split(groups: Sequence[str], train_fraction: float = 0.75, seed: int = 42) -> tuple[list[int], list[int]]:
    """Indices of a train/validation split that keeps each group's share (seeded, deterministic)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for g in sorted(by_group):
        idx = by_group[g][:]
        rng.shuffle(idx)
        n_train = round(len(idx) * train_fraction)
        if len(idx) >= 2:
            n_train = min(max(n_train, 1), len(idx) - 1)
        train += idx[:n_train]
        val += idx[n_train:]
    return sorted(train), sorted(val)


def corpus(answers: Sequence[str]) -> tuple[list[str], list[int]]:
    """Distinct answers (the corpus) and each pair's index in it."""
    index: dict[str, int] = {}
    for a in answers:
        index.setdefault(a, len(index))
    return list(index), [index[a] for a in answers]
