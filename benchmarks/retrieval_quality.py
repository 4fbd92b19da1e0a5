"""Retrieval quality: the fine-tuned embedder against the same model untrained and BM25, on held-out episodes.

Trains on the train split (KnowMap pairs, InfoNCE on Ray Train, plus the reranker), evaluates on the dev split of
the same tasks (and of ``--unseen`` tasks never trained on), and reports nDCG@10 per KB kind. Baseline, measured in
the same run: the base MiniLM and BM25 on the same queries and corpora. Goal: fine-tuned >= 1.3 x base and above
BM25, for both KB kinds. Run from the repository root:

    .venv/bin/python benchmarks/retrieval_quality.py [--tasks boil,melt] [--train-variations 5] [--variations 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lib.results import Check, write_result

from knowmap.config import KnowMapConfig
from knowmap.jobs.training import evaluate_split, retrieval_table, train_retriever

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "retrieval_quality.json"
TASKS = ["boil", "melt", "freeze", "find-living-thing", "use-thermometer", "test-conductivity"]
UNSEEN = ["find-plant", "change-the-state-of-matter-of"]
GOAL = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--unseen", default=",".join(UNSEEN), help="dev-only tasks, never in training data")
    parser.add_argument("--train-variations", type=int, default=5, help="train-split variations per task")
    parser.add_argument("--variations", type=int, default=3, help="dev variations per task")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unseen = [t for t in args.unseen.split(",") if t]
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="knowmap-retrieval-"))
    config = KnowMapConfig(data_dir=data_dir, scienceworld={"tasks": tasks, "variations": args.train_variations},
                           training={"epochs": args.epochs})

    started = time.perf_counter()
    report = train_retriever(config, tasks=tasks, variations=args.train_variations,
                             on_epoch=lambda m, e: print(f"  {m} epoch {e.get('epoch')}: loss {e.get('loss'):.4f}"))
    trained = time.perf_counter() - started
    print(f"trained on {report.episodes} train episodes, pairs {report.pairs} in {trained:.0f} s")
    results = evaluate_split(config, split="dev", tasks=tasks + unseen, variations=args.variations,
                             out=data_dir / "eval_dev.json")
    print(retrieval_table(results))

    rows, checks = {}, []
    for kind, block in results.kinds.items():
        base, tuned, bm25 = (results.ndcg(kind, s) for s in ("base", "finetuned", "bm25"))
        unseen_tuned = results.ndcg(kind, "finetuned", subset="unseen")
        unseen_base = results.ndcg(kind, "base", subset="unseen")
        rows[kind] = {"bm25": bm25, "base": base, "finetuned": tuned, "ratio_vs_base": tuned / base if base else None,
                      "beats_bm25": tuned > bm25, "unseen_base": unseen_base, "unseen_finetuned": unseen_tuned,
                      "reranked": {s: results.ndcg(kind, s) for s in block.systems if s.endswith("+rerank")}}
        checks.append(Check(f"ndcg@10_{kind}_finetuned_over_base", value=rows[kind]["ratio_vs_base"], goal=GOAL,
                            baseline=base, result=tuned, conditions={"above BM25": tuned > bm25}))
    met = all(check.met for check in checks)
    print()
    print(f"{'kind':<11} {'BM25':>7} {'base':>7} {'tuned':>7} {'ratio':>6}  {'unseen base':>11} {'unseen tuned':>12}")
    for kind, row in rows.items():
        ub = f"{row['unseen_base']:.3f}" if row["unseen_base"] is not None else "-"
        ut = f"{row['unseen_finetuned']:.3f}" if row["unseen_finetuned"] is not None else "-"
        print(f"{kind:<11} {row['bm25']:>7.3f} {row['base']:>7.3f} {row['finetuned']:>7.3f} "
              f"{row['ratio_vs_base']:>6.2f}  {ub:>11} {ut:>12}")
    print(f"goal: fine-tuned nDCG@10 >= {GOAL} x base and above BM25 for both kinds: {'met' if met else 'NOT met'}")
    worst = min(row["ratio_vs_base"] or 0.0 for row in rows.values())
    result = {"metric": "ndcg@10_finetuned_over_base_min_over_kinds", "value": worst, "goal": GOAL,
              "details": {"per_kind": rows, "goal_met": met, "checks": checks, "train_seconds": trained,
                          "pairs": report.pairs,
                          "protocol": {**results.protocol.model_dump(mode="json"), "epochs": args.epochs,
                                       "train_variations": args.train_variations, "train_split": "train",
                                       "eval_split": "dev"}}}
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
