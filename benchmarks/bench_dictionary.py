"""Time of the dictionary (token2map, then map2token, forward and backward) as hafa computes it (one
embedding_bag each way) against dense averaging matrices applied with a batched matmul (the form
hafa used first), at the sizes where PVT v2's stage-4 MLP meets it: 224 x 224 (batch 32), 512 x 512
(segmentation, batch 16) and 800 x 1333 (detection, batch 2). The dense matrices are the
dictionary applied to identity inputs, built once outside the timing, so the comparison favours
them. Outputs and gradients of both are checked to agree. CPU time of one thread, median.
At 224 the matrices are tiny and win here; whole models time the same either way.

    python benchmarks/bench_dictionary.py [--repeats 5] [--json PATH]
"""

import argparse
import json
import time
from functools import partial

import torch

from hafa.ops import map2token, token2map

# (name, batch, stage-3 grid, stage-4 map, tokens, channels): the 4C-wide hidden tokens of the MLP
SIZES = [
    ("224x224, PVT v2-B1", 32, (14, 14), (7, 7), 49, 2048),
    ("512x512, PVT v2-B1", 16, (32, 32), (16, 16), 256, 2048),
    ("800x1333, PVT v2-B0", 2, (50, 84), (25, 42), 1050, 1024),
    ("800x1333, PVT v2-B1", 2, (50, 84), (25, 42), 1050, 2048),
]


def dense_matrices(index, grid, size, num_tokens):
    """B x P x M painting and B x M x P averaging matrices: the dictionary applied to identities."""
    B, P = index.shape[0], size[0] * size[1]
    paint = token2map(torch.eye(num_tokens).expand(B, -1, -1), index, grid, size).flatten(2)  # B x M x P
    average = map2token(torch.eye(P).view(1, P, *size).expand(B, -1, -1, -1), index, grid, num_tokens)
    return paint.transpose(1, 2).contiguous(), average.contiguous()


def round_trip(tokens, index, grid, size, matrices=None):
    """token2map then map2token (as in the MLP around its depthwise conv), and the gradient."""
    B, M, C = tokens.shape
    if matrices is None:
        back = map2token(token2map(tokens, index, grid, size) * 2, index, grid, M)
    else:
        paint, average = matrices
        back = torch.bmm(average, torch.bmm(paint, tokens) * 2)
    back.square().sum().backward()
    return back


def cpu_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| size | batch | tokens x channels | embedding_bag (ms) | dense matrices (ms) | dense / bag |")
    print("|---|---:|---|---:|---:|---:|")
    for name, B, grid, size, M, C in SIZES:
        g = torch.Generator().manual_seed(0)
        index = torch.randint(0, M, (B, grid[0] * grid[1]), generator=g)
        tokens = torch.randn(B, M, C, generator=g, requires_grad=True)
        matrices = dense_matrices(index, grid, size, M)
        outputs, grads = [], []
        for form in (None, matrices):
            tokens.grad = None
            outputs.append(round_trip(tokens, index, grid, size, form).detach())
            grads.append(tokens.grad.clone())
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
        bag = cpu_ms(partial(round_trip, tokens, index, grid, size), args.repeats)
        dense = cpu_ms(partial(round_trip, tokens, index, grid, size, matrices), args.repeats)
        rows.append(dict(size=name, batch=B, tokens=M, channels=C, bag_ms=round(bag, 2), dense_ms=round(dense, 2)))
        print(f"| {name} | {B} | {M} x {C} | {bag:.1f} | {dense:.1f} | {dense / bag:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
