"""Maximum-entropy exploration against two re-ranking baselines on a trained model: relevance vs exposure.

    python benchmarks/bench_explore.py --out runs/beauty --dataset /work/shared/data/amazon-beauty \\
        [run options OUT was trained with] [--lams 0,0.05,0.1] [--max-users 2000] [--iters 20]
    python benchmarks/bench_explore.py --out runs/demo [--run-config run.toml]    # a `plum demo` / stage workdir

``--out`` is a trained output folder: of ``plum run`` / ``bench_retrieval.py`` (give its ``--dataset``
and the run options it was trained with, which are checked against ``OUT/plan.json``), or of ``plum demo``
or the stage commands (``--run-config``: the run configuration it was made with, default the built-in).
The model is ``OUT/sft/model``. On the users of ``--split`` (the first ``--max-users``), history excluded,
K = ``-k``:

- ``maxent``: the Frank-Wolfe mixture (:func:`plumrec.retrieval.explore.fit_exploration`, ``--iters``
  steps, fitted on the users it serves) for each lambda of ``--lams``, served with ``--seed`` (one
  component per user);
- ``pop_penalty``: the plain beams' items re-ranked by ``score - beta * log(1 + train count)`` for each
  beta of ``--betas``;
- ``sample``: K items drawn without replacement from the plain beams' items with probabilities
  ``softmax(score / T)`` (Gumbel top-K, ``--seed``) for each T of ``--temperatures``.

Every row has R@K, N@K, coverage@K, the exposure entropy (and normalised), Gini, tail exposure and novelty
(:mod:`plumrec.metrics`), and the change of R@K and coverage@K relative to plain beam search. The serving
cost is measured in the same run on one batch (``--eval-batch-size`` users, the same beam width): the
median over ``--repeats`` of one biased beam search against one plain one (the beam step's bias alone),
and of ``recommend`` with the largest lambda's policy (one search per batch, each user reading its
component's row of the policy's ``[T, E]`` tables) against plain ``recommend``. Writes
``RESULTS/explore.csv``, ``explore.md``, ``explore.json`` and, with matplotlib (``pip install
plumrec[bench]``), ``explore.png`` (R@K against coverage@K and entropy); ``RESULTS`` is ``--results``
(default ``OUT/explore_bench``). ``--smoke``: small grids, few users and iterations (the test).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, environment  # noqa: E402

from plumrec.explore import Regulariser, TriePaths, exposure_edge_bias  # noqa: E402
from plumrec.io import resolve_dir, write_json, write_text  # noqa: E402
from plumrec.metrics import evaluate_lists, item_popularity  # noqa: E402
from plumrec.model import PlumLM, SIDVocab  # noqa: E402
from plumrec.model.config import PRESETS  # noqa: E402
from plumrec.model.config import preset as make_preset  # noqa: E402
from plumrec.pipeline.config import load_run_config  # noqa: E402
from plumrec.pipeline.options import parse_run_args  # noqa: E402
from plumrec.pipeline.plan import read_plan  # noqa: E402
from plumrec.pipeline.stages import retriever as load_retriever  # noqa: E402
from plumrec.pipeline.workspace import Workspace  # noqa: E402
from plumrec.retrieval import GenerativeRetriever  # noqa: E402
from plumrec.retrieval.explore import ExplorationPolicy, fit_exploration, rank_beam_items, trie_signature  # noqa: E402
from plumrec.sid import build_trie  # noqa: E402

GRIDS = {"lams": "0,0.01,0.02,0.05,0.1,0.2,0.5,1", "betas": "0,0.01,0.02,0.05,0.1,0.2,0.5",
         "temperatures": "0.1,0.25,0.5,1,2"}
SMOKE = {"lams": [0.0, 0.5, 2.0], "betas": [0.0, 0.5], "temperatures": [0.5, 2.0], "iters": 3, "max_users": 24,
         "repeats": 2}
COLUMNS = ("method", "param", "recall", "ndcg", "coverage", "entropy", "entropy_norm", "gini", "tail_exposure",
           "novelty", "recall_change", "coverage_change", "components", "final_gap", "fit_s")


def _floats(p: argparse.ArgumentParser, flag: str, text: str, positive: bool = False) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        p.error(f"{flag} must be comma-separated numbers, got {text!r}")
    if not vals or any(not np.isfinite(v) or v < 0 or (positive and v == 0) for v in vals):
        p.error(f"{flag} must hold finite numbers {'> 0' if positive else '>= 0'}, got {text!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="trained output folder (model: OUT/sft/model)")
    p.add_argument("--dataset", default=None, help="OUT is a `plum run` / bench_retrieval output on this dataset; "
                   "further run options are passed to its option parser")
    p.add_argument("--run-config", default=None, help="without --dataset: the run configuration OUT was made with")
    for name, default in GRIDS.items():
        p.add_argument(f"--{name}", default=default, help=f"grid (default {default})")
    p.add_argument("--iters", type=int, default=20, help="Frank-Wolfe iterations per lambda")
    p.add_argument("-k", type=int, default=10, help="list length K")
    p.add_argument("--beam-width", type=int, default=None,
                   help="beam width (default the run's eval.beam_width); give about 3K: with history excluded "
                   "every user needs K beam items outside the history, and the sampling baseline draws K of the "
                   "beam's items")
    p.add_argument("--eval-batch-size", type=int, default=None, help="users per search (default the run's)")
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--max-users", type=int, default=None, help="the first N users of the split")
    p.add_argument("--seed", type=int, default=0, help="serving and sampling seed")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the serving cost (median)")
    p.add_argument("--cost-users", type=int, default=None,
                   help="users of the timed recommend request (default 4 batches)")
    p.add_argument("--cache-gb", type=float, default=2.0, help="prefill cache kept across Frank-Wolfe iterations")
    p.add_argument("--results", default=None, help="output folder (default OUT/explore_bench)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--smoke", action="store_true", help="small grids, few users and iterations")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--synthetic", default=None, metavar="PRESET",
                   help="only the serving cost, on a random model of this preset (e.g. medium-deep) over a random "
                        "catalogue; no --out needed")
    p.add_argument("--synthetic-items", type=int, default=12101, help="catalogue size (default Beauty's)")
    p.add_argument("--synthetic-codebooks", default="1024,64,32,16", help="SID codebook sizes")
    p.add_argument("--synthetic-components", type=int, default=20, help="components of the random policy")
    a, rest = p.parse_known_args(argv)
    if (a.out is None) == (a.synthetic is None):
        p.error("pass --out (a trained output folder) or --synthetic PRESET (the serving cost alone)")
    if rest and a.dataset is None:
        p.error(f"unrecognized arguments: {' '.join(rest)} (run options need --dataset)")
    a.run_argv = rest
    a.lams, a.betas = _floats(p, "--lams", a.lams), _floats(p, "--betas", a.betas)
    a.temperatures = _floats(p, "--temperatures", a.temperatures, positive=True)
    for flag, v, low in (("--iters", a.iters, 0), ("-k", a.k, 1), ("--repeats", a.repeats, 1),
                         ("--seed", a.seed, 0), ("--max-users", a.max_users, 1), ("--beam-width", a.beam_width, 1),
                         ("--eval-batch-size", a.eval_batch_size, 1), ("--threads", a.threads, 1),
                         ("--cost-users", a.cost_users, 1)):
        if v is not None and v < low:
            p.error(f"{flag} must be >= {low}, got {v}")
    if not a.cache_gb >= 0:
        p.error(f"--cache-gb must be >= 0, got {a.cache_gb}")
    if a.synthetic is not None:
        _check_synthetic(p, a)
    if a.smoke:
        a.lams, a.betas, a.temperatures = SMOKE["lams"], SMOKE["betas"], SMOKE["temperatures"]
        a.iters, a.repeats = SMOKE["iters"], SMOKE["repeats"]
        a.max_users = min(a.max_users or SMOKE["max_users"], SMOKE["max_users"])
    return a


def _check_synthetic(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.synthetic not in PRESETS:
        p.error(f"--synthetic must be a model preset, one of {sorted(PRESETS)}, got {a.synthetic!r}")
    try:
        a.synthetic_codebooks = [int(v) for v in a.synthetic_codebooks.split(",")]
    except ValueError:
        p.error(f"--synthetic-codebooks must be comma-separated integers, got {a.synthetic_codebooks!r}")
    if min(a.synthetic_codebooks) < 2 or a.synthetic_items < 1 or a.synthetic_components < 1:
        p.error("--synthetic-codebooks must be >= 2 each, --synthetic-items and --synthetic-components >= 1")
    if a.synthetic_items > 0.5 * float(np.prod(a.synthetic_codebooks, dtype=np.float64)):
        p.error(f"--synthetic-items {a.synthetic_items} needs more SIDs: codebooks {a.synthetic_codebooks}")


def synthetic(a: argparse.Namespace):
    """``(retriever, histories, policy)``: a random ``--synthetic`` model over random unique SIDs, random
    histories of 4..12 items, and a policy of ``--synthetic-components`` tables split from random exposures."""
    rng = np.random.default_rng(a.seed)
    sizes, n = a.synthetic_codebooks, a.synthetic_items
    codes = np.zeros((0, len(sizes)), np.int64)
    while len(codes) < n:
        more = np.stack([rng.integers(0, v, 2 * n) for v in sizes], 1)
        codes = np.unique(np.concatenate([codes, more]), axis=0)
    codes = codes[rng.permutation(len(codes))[:n]]
    vocab = SIDVocab(256, sizes)
    torch.manual_seed(a.seed)
    model = PlumLM(make_preset(a.synthetic, vocab_size=vocab.size)).eval()
    trie = build_trie(codes, sizes)
    r = GenerativeRetriever(model, vocab, trie, codes, beam_width=a.beam_width or 20,
                            batch_size=a.eval_batch_size or 256, max_items=20)
    hists = [rng.integers(0, n, int(rng.integers(4, 13))) for _ in range(a.max_users or r.batch_size)]
    paths, reg = TriePaths(trie), Regulariser.entropy()
    splits = [exposure_edge_bias(paths, rng.dirichlet(np.full(n, 0.1)), 0.1, a.k, reg)
              for _ in range(a.synthetic_components)]
    T = len(splits)
    policy = ExplorationPolicy(np.stack([s.edge for s in splits]), np.stack([s.item for s in splits]),
                               np.full(T, 1.0 / T), 0.1, a.k, trie_signature(trie), [0.0], [0.0])
    return r, hists, policy


def workspace(a: argparse.Namespace) -> Workspace:
    """The workspace of OUT: a `plum run` output (its plan and options) or a `plum demo` / stage workdir."""
    out = Path(a.out)
    if a.dataset is not None:
        extra = [*(["--beam-width", str(a.beam_width)] if a.beam_width else []),
                 *(["--eval-batch-size", str(a.eval_batch_size)] if a.eval_batch_size else [])]
        run = parse_run_args(["--dataset", a.dataset, "--out", str(out), *a.run_argv, *extra],
                             prog="bench_explore.py (run options)")
        plan, cfg = read_plan(run, out, out / "item_embeddings.npy")
        if plan is None:
            raise SystemExit(f"{out}/plan.json does not exist: --out must be a trained `plum run` output")
    else:
        cfg = load_run_config(a.run_config, workdir=str(out))
        for key, v in (("beam_width", a.beam_width), ("batch_size", a.eval_batch_size)):
            if v is not None:
                cfg["eval"][key] = v
    if not (resolve_dir(out / "sft" / "model") / "model.safetensors").exists():
        raise SystemExit(f"{out}/sft/model/model.safetensors does not exist: train OUT first")
    return Workspace(cfg)


def candidates(r, hists, paths: TriePaths) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per user: the plain beams' items (history dropped) and their beam scores, best first."""
    rec = r.recommend(hists, r.beam_width)
    out = []
    for u, (items, beams) in enumerate(rank_beam_items(paths, rec.codes, rec.scores)):
        keep = ~np.isin(items, hists[u])
        out.append((items[keep], rec.scores[u, beams[keep]].astype(np.float64)))
    return out


def pop_penalty(cands, log_pop: np.ndarray, beta: float, k: int) -> list[np.ndarray]:
    """Each user's candidates re-ranked by ``score - beta * log_pop`` (stable), first ``k``."""
    return [items[np.argsort(-(s - beta * log_pop[items]), kind="stable")[:k]] for items, s in cands]


def sample(cands, temperature: float, k: int, seed: int) -> list[np.ndarray]:
    """``k`` candidates per user drawn without replacement with probabilities ``softmax(score / T)``."""
    rng = np.random.default_rng(seed)
    return [items[np.argsort(-(s / temperature + rng.gumbel(size=len(s))), kind="stable")[:k]] for items, s in cands]


def _row(method: str, param: float, lists, targets, m: int, k: int, pop, **extra) -> dict:
    res = evaluate_lists(lists, targets, m, [k], popularity=pop)
    row = {"method": method, "param": param, "recall": res[f"recall@{k}"], "ndcg": res[f"ndcg@{k}"],
           "coverage": res[f"coverage@{k}"]}
    row.update({c: res[f"{c}@{k}"] for c in ("entropy", "entropy_norm", "gini", "tail_exposure", "novelty")})
    return {**row, **extra}


def evaluate(a, r, hists, targets, pop) -> tuple[list[dict], dict]:
    """Every method's rows, and the policies fitted per lambda."""
    m, k = r.num_items, a.k
    cands = candidates(r, hists, TriePaths(r.trie))
    short = sum(len(items) < k for items, _ in cands)
    if short:
        print(f"note: {short} users have fewer than {k} beam items outside their history (beam width {r.beam_width})")
    log_pop = np.log1p(pop)
    rows = [_row("pop_penalty", b, pop_penalty(cands, log_pop, b, k), targets, m, k, pop) for b in a.betas]
    rows += [_row("sample", t, sample(cands, t, k, a.seed), targets, m, k, pop) for t in a.temperatures]
    policies = {}
    for lam in a.lams:
        t0 = time.perf_counter()
        policy = fit_exploration(r, hists, lam=lam, k=k, iters=a.iters, exclude_history=True,
                                 progress=not a.no_progress, cache_bytes=int(a.cache_gb * 2**30))
        fit_s = time.perf_counter() - t0
        comps = policy.components(np.arange(len(hists)), a.seed)
        lists = policy.mixture.lists[comps, np.arange(len(hists))]
        rows.append(_row("maxent", lam, lists, targets, m, k, pop, components=policy.num_components,
                         final_gap=float(policy.gaps[-1]), fit_s=fit_s))
        policies[lam] = policy
    plain = _row("plain", 0.0, [items[:k] for items, _ in cands], targets, m, k, pop)
    rows = [plain, *rows]
    for row in rows:
        row["recall_change"] = row["recall"] / plain["recall"] - 1 if plain["recall"] else float("nan")
        row["coverage_change"] = row["coverage"] / plain["coverage"] - 1
    return rows, policies


def serving_cost(a, r, hists, policy) -> dict:
    """Per-user milliseconds of one biased vs one plain beam search on the same batch (the policy's heaviest
    component with a bias), and of ``recommend`` with ``policy`` vs plain over the first ``--cost-users``
    users (the same batches, each one search); medians of ``--repeats``, the four runs alternating."""
    batch, request = hists[:r.batch_size], hists[:a.cost_users or 4 * r.batch_size]
    live = [t for t in np.argsort(-policy.weights) if policy.edge_bias[t].any()]
    table = torch.from_numpy(policy.edge_bias[live[0] if live else 0].copy()).to(r._device())
    explored = copy.copy(r)  # the same model and trie, serving the policy
    explored.explore = policy
    runs = {"search_plain": lambda: r._search(batch), "search_biased": lambda: r._search(batch, table),
            "recommend_plain": lambda: r.recommend(request, a.k, exclude_history=True),
            "recommend_explore": lambda: explored.recommend(request, a.k, exclude_history=True, seed=a.seed)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(a.repeats + 1):  # the first round warms up
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) / len(batch if name.startswith("search") else request)
           for name, ts in times.items()}
    return {"users": len(batch), "request_users": len(request), "batch_size": r.batch_size,
            "beam_width": r.beam_width, "repeats": a.repeats, "threads": torch.get_num_threads(), "lam": policy.lam,
            "components": policy.num_components, "request_searches": int(np.ceil(len(request) / r.batch_size)),
            "plain_searches": int(np.ceil(len(request) / r.batch_size)),
            **{f"{name}_ms_per_user": 1e3 * s for name, s in med.items()},
            "search_ratio": med["search_biased"] / med["search_plain"],
            "recommend_ratio": med["recommend_explore"] / med["recommend_plain"]}

def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def tables(rows: list[dict], k: int) -> tuple[str, str]:
    """``(CSV, markdown)`` of the rows."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({c: _fmt(row.get(c)) for c in COLUMNS})
    head = ["method", "param", f"R@{k}", f"N@{k}", f"cov@{k}", "entropy", "Gini", "tail", "novelty", "dR", "dcov"]
    keys = ["method", "param", "recall", "ndcg", "coverage", "entropy", "gini", "tail_exposure", "novelty",
            "recall_change", "coverage_change"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], f"{row['param']:g}"] + [f"{row[c]:.4f}" for c in keys[2:9]]
        cells += [f"{100 * row[c]:+.1f}%" for c in keys[9:]]
        md.append("| " + " | ".join(cells) + " |")
    return buf.getvalue(), "\n".join(md) + "\n"


def verdict(rows: list[dict]) -> dict:
    """The issue's targets: a lambda losing at most 2% relative R@K for at least +20% relative coverage@K, and
    whether every baseline point is matched or beaten on both (R@K, coverage@K) by some maxent point."""
    fw = [r for r in rows if r["method"] == "maxent"]
    ok = [r["param"] for r in fw if r["recall_change"] >= -0.02 and r["coverage_change"] >= 0.20]
    base = [b for b in rows if b["method"] in ("pop_penalty", "sample")]
    free = [b for b in base if not any(f["recall"] >= b["recall"] and f["coverage"] >= b["coverage"] for f in fw)]
    return {"target_lams": ok, "target_met": bool(ok), "baseline_points": len(base),
            "baseline_points_not_dominated": [(b["method"], b["param"]) for b in free],
            "maxent_dominates": bool(fw) and not free}


def plot(rows: list[dict], path: Path, k: int) -> str | None:
    """R@K against coverage@K and entropy per method, to ``path``; a message instead without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'plumrec[bench]'): no plot written"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in ((axes[0], "coverage", f"coverage@{k}"), (axes[1], "entropy", f"exposure entropy@{k}")):
        for method, marker in (("maxent", "o-"), ("pop_penalty", "s--"), ("sample", "^:")):
            pts = sorted((r[x], r["recall"], r["param"]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=method)
                for px, py, par in pts:
                    ax.annotate(f"{par:g}", (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
        plain = next(r for r in rows if r["method"] == "plain")
        ax.plot([plain[x]], [plain["recall"]], "k*", markersize=12, label="plain beam")
        ax.set_xlabel(label), ax.set_ylabel(f"R@{k}"), ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("max-entropy exploration vs re-ranking baselines (history excluded)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.synthetic is not None:
        return synthetic_main(a)
    ws = workspace(a)
    r = load_retriever(ws, Path(a.out) / "sft" / "model")
    if a.k > r.beam_width:
        raise SystemExit(f"-k {a.k} exceeds the beam width {r.beam_width}: pass --beam-width >= K")
    es = getattr(ws.split, a.split)
    n = len(es.targets) if a.max_users is None else min(a.max_users, len(es.targets))
    hists, targets = list(es.histories)[:n], np.asarray(es.targets)[:n]
    pop = item_popularity(ws.split.train, ws.num_items)
    print(f"{ws.num_items} items, {n} {a.split} users, beam width {r.beam_width}, K = {a.k}, history excluded")
    t0 = time.perf_counter()
    rows, policies = evaluate(a, r, hists, targets, pop)
    cost = serving_cost(a, r, hists, policies[max(policies)]) if policies else {}
    res_dir = Path(a.results) if a.results else Path(a.out) / "explore_bench"
    res_dir.mkdir(parents=True, exist_ok=True)
    csv_text, md = tables(rows, a.k)
    check = verdict(rows)
    summary = (f"\nserving cost (beam width {r.beam_width}, {torch.get_num_threads()} threads): biased / plain "
               f"search on the same {cost.get('users')} users {cost.get('search_ratio', float('nan')):.3f}; "
               f"recommend to {cost.get('request_users')} users with the lambda {cost.get('lam')} policy / plain "
               f"{cost.get('recommend_ratio', float('nan')):.3f} ({cost.get('request_searches')} searches against "
               f"{cost.get('plain_searches')})\ntarget (<= 2% R@{a.k} loss, >= +20% "
               f"coverage@{a.k}): {'met at lambda ' + str(check['target_lams']) if check['target_met'] else 'not met'}"
               f"; maxent dominates the baselines: {check['maxent_dominates']}\n")
    write_text(res_dir / "explore.csv", csv_text)
    write_text(res_dir / "explore.md", md + summary)
    message = plot(rows, res_dir / "explore.png", a.k)
    out = {"environment": environment(), "command": command_line(), "users": n, "split": a.split, "k": a.k,
           "beam_width": r.beam_width, "iters": a.iters, "rows": rows, "serving_cost": cost, "verdict": check,
           "gaps": {str(lam): p.gaps.tolist() for lam, p in policies.items()},
           "plot": message or str(res_dir / "explore.png"), "seconds": time.perf_counter() - t0}
    write_json(res_dir / "explore.json", out, indent=1)
    print(md + summary + (message or f"wrote {res_dir / 'explore.png'}"))
    return out


def synthetic_main(a: argparse.Namespace) -> dict:
    """``--synthetic``: the serving cost alone, on a random model and catalogue; ``RESULTS/explore_cost.json``."""
    r, hists, policy = synthetic(a)
    print(f"random {a.synthetic} model, {r.num_items} items, SIDs {a.synthetic_codebooks}, {len(hists)} users, "
          f"beam width {r.beam_width}, {policy.num_components} components, {torch.get_num_threads()} threads")
    cost = serving_cost(a, r, hists, policy)
    out = {"environment": environment(), "command": command_line(), "preset": a.synthetic,
           "items": r.num_items, "codebooks": a.synthetic_codebooks, "serving_cost": cost}
    res_dir = Path(a.results) if a.results else Path("runs") / "explore_cost"
    res_dir.mkdir(parents=True, exist_ok=True)
    write_json(res_dir / "explore_cost.json", out, indent=1)
    print(json.dumps(cost, indent=1))
    return out


if __name__ == "__main__":
    main()
