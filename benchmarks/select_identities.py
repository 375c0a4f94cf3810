"""Speed of `facegen select-identities` (blockwise highest-similarity ranking) on random unit vectors.

    python benchmarks/select_identities.py                 # 110,000 identities (all of DigiFace-1M), 512-d
    python benchmarks/select_identities.py --n 20000 --baseline-n 20000

Prints, measured in this run:
- a baseline: every row block against all columns (N^2 products, the straightforward blockwise way) at
  ``--baseline-n`` identities, and facegen's symmetric tiling (N^2 / 2) at the same size, with their ratio;
- block sizes compared at that size;
- the full run at ``--n`` identities, its peak extra memory, and the time against the 5-minute target;
- ``--method greedy`` (drop the most similar remaining identity one at a time) at ``--n`` identities on the same
  vectors, with and without planted near-duplicate pairs, and its time against the one-pass run.
Set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS to the core count you want to measure (the target is 2 cores).
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

from facegen.builders.quality.identities import max_similarity, select_greedy, select_least_similar
from facegen.generators.embeddings import normalize


def full_rows_baseline(embeddings: np.ndarray, block: int = 2048) -> np.ndarray:
    """Row blocks x all columns: the straightforward blockwise version, computing every product twice."""
    unit = normalize(embeddings)
    best = np.empty(len(unit), dtype=np.float32)
    for r0 in range(0, len(unit), block):
        rows = unit[r0:r0 + block]
        sims = rows @ unit.T
        sims[np.arange(len(rows)), np.arange(r0, r0 + len(rows))] = -np.inf
        best[r0:r0 + block] = sims.max(axis=1)
    return best


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=110_000, help="identities in the full run")
    parser.add_argument("--baseline-n", type=int, default=20_000, help="identities for the baseline comparison")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=1000, help="near-duplicate pairs planted for the greedy run")
    parser.add_argument("--skip-baseline", action="store_true", help="only the full runs")
    args = parser.parse_args()

    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"cpu cores visible: {os.cpu_count()}, BLAS threads: {threads}")
    rng = np.random.default_rng(0)

    n = args.baseline_n
    if args.skip_baseline:
        n = 0
    x = normalize(rng.standard_normal((n, args.dim)))
    if n:
        reference, t_base = timed(full_rows_baseline, x, args.block)
        ours, t_ours = timed(max_similarity, x, args.block)
        assert np.allclose(reference, ours, atol=1e-5)
        print(f"\n{n} identities: baseline (row blocks x all columns) {t_base:.2f} s, "
              f"facegen (symmetric tiles) {t_ours:.2f} s -> {t_base / t_ours:.2f}x faster")
        for block in (1024, 2048, 4096):
            _, t = timed(max_similarity, x, block)
            print(f"  block {block}: {t:.2f} s ({t_base / t:.2f}x the baseline)")

    n = args.n
    x = normalize(rng.standard_normal((n, args.dim)))
    tracemalloc.start()
    selection, t_full = timed(select_least_similar, [str(i) for i in range(n)], x, min(args.count, n - 1),
                              args.block)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\n{n} identities x {args.dim}: select {len(selection.ids)} in {t_full:.1f} s "
          f"({300 / t_full:.1f}x under the 300 s target); peak extra memory {peak / 2**20:.0f} MiB "
          f"(an N x N float32 matrix would be {n * n * 4 / 2**30:.1f} GiB)")
    if not args.skip_baseline:
        predicted = t_ours * (n / args.baseline_n) ** 2
        print(f"  (N^2 scaling from the {args.baseline_n} run predicted {predicted:.1f} s)")

    # greedy: the same vectors, then with near-duplicate pairs planted (the later member of each is expected out)
    count = min(args.count, n - 1)
    ids = [str(i) for i in range(n)]
    greedy, t_greedy = timed(select_greedy, ids, x, count, args.block)
    print(f"greedy: select {len(greedy.ids)} in {t_greedy:.1f} s ({t_greedy / t_full:.2f}x the one-pass run); "
          f"{greedy.refreshed} neighbour lists recomputed; highest kept similarity {greedy.threshold:.4f} "
          f"(one-pass: {selection.threshold:.4f})")
    pairs = min(args.pairs, n // 2)
    twins = rng.choice(n - pairs, pairs, replace=False)
    x[n - pairs:] = normalize(x[twins] + 0.1 * rng.standard_normal((pairs, args.dim)).astype(np.float32)
                              / np.sqrt(args.dim))
    planted, t_planted = timed(select_greedy, ids, x, count, args.block)
    kept = set(planted.ids)
    both = sum(str(a) in kept and str(b) in kept for a, b in zip(twins, range(n - pairs, n)))
    one_pass = select_least_similar(ids, x, count, args.block)
    none_kept = sum(str(a) not in set(one_pass.ids) and str(b) not in set(one_pass.ids)
                    for a, b in zip(twins, range(n - pairs, n)))
    print(f"with {pairs} planted near-duplicate pairs: greedy {t_planted:.1f} s, pairs with both members kept: "
          f"{both}; one-pass drops both members of {none_kept} pairs")


if __name__ == "__main__":
    main()
