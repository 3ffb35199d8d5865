"""Time and peak memory of SIA's clustering path (cluster_dpc_knn + merge_tokens + token2map)
against a straightforward implementation of the same equations (full N x N tensors, the way
TCFormer writes it), at the stage-3 token counts of classification (196), segmentation (1024) and
detection (4200), C = 320. Each measurement runs in its own process so that peak memory
(ru_maxrss growth over the inputs) belongs to one call.

    python benchmarks/bench_clustering.py [--batches 1 8 32] [--tokens 196 1024 4200] [--repeats 3]
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

from hafa.ops import cluster_dpc_knn, merge_tokens, token2map


def straightforward(x, num_clusters, k=5):
    """The equations with full N x N tensors: cdist, kNN density, masked min over denser tokens."""
    B, N, C = x.shape
    d = torch.cdist(x, x) / math.sqrt(C)
    rho = (-(d.topk(k, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    order = torch.sort(-rho, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N).expand(B, N))
    denser = rank[:, None, :] < rank[:, :, None]
    d_max = d.flatten(1).max(-1).values[:, None, None]
    delta = torch.where(denser, d, d_max).min(-1).values
    centres = torch.sort(rho * delta, dim=-1, descending=True, stable=True).indices[:, :num_clusters]
    ids = d.gather(1, centres[:, :, None].expand(B, num_clusters, N)).argmin(1)
    ids.scatter_(1, centres, torch.arange(num_clusters).expand(B, num_clusters))
    return ids


def sia_path(impl, x, scores, grid):
    num_clusters = math.ceil(x.shape[1] / 4)
    ids = cluster_dpc_knn(x, num_clusters)[0] if impl == "fast" else straightforward(x, num_clusters)
    merged = merge_tokens(x, ids, num_clusters, scores)
    return token2map(merged, ids, grid, ((grid[0] + 1) // 2, (grid[1] + 1) // 2))


def grid_for(n):
    return {196: (14, 14), 1024: (32, 32), 4200: (50, 84)}.get(n, (1, n))


def measure(impl, batch, tokens, repeats):
    """In this process: median seconds of one call and peak resident memory growth (GB)."""
    torch.manual_seed(0)
    x, scores = torch.randn(batch, tokens, 320), torch.randn(batch, tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        sia_path(impl, x, scores, grid_for(tokens))
        peak_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            sia_path(impl, x, scores, grid_for(tokens))
            times.append(time.perf_counter() - start)
    return dict(seconds=sorted(times)[len(times) // 2], peak_gb=round(peak_gb, 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 1024, 4200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-straightforward-gb",
        type=float,
        default=12.0,
        help="skip the straightforward version where its N x N tensors would exceed this",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "B", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]), args.repeats)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; C = 320, k = 5, ratio 0.25, "
        f"median of {args.repeats}"
    )
    print("| B | N | fast (s) | straightforward (s) | speed-up | fast peak (GB) | straightforward peak (GB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for tokens in args.tokens:
        for batch in args.batches:
            row = dict(batch=batch, tokens=tokens)
            for impl in ("fast", "straightforward"):
                if impl == "straightforward" and 4 * batch * tokens * tokens * 4 / 2**30 > args.max_straightforward_gb:
                    row[impl] = None
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--one", impl, str(batch), str(tokens), "--repeats", str(args.repeats)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row[impl] = json.loads(out.stdout)
            rows.append(row)
            fast, slow = row["fast"], row["straightforward"]
            ratio = f"x{slow['seconds'] / fast['seconds']:.2f}" if slow else "-"
            print(
                f"| {batch} | {tokens} | {fast['seconds']:.4f} | {slow['seconds'] if slow else 'skipped'} | {ratio} | "
                f"{fast['peak_gb']} | {slow['peak_gb'] if slow else '-'} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
