"""Slow, obviously-correct implementations written straight from the paper's equations."""

import math

import torch
import torch.nn.functional as F


def dpc_knn_reference(x, num_clusters, k=5, mask=None):
    """DPC-KNN for one image, loops over tokens, float64. x: N x C; mask: N bools (True = padding)."""
    x = x.double()
    N, C = x.shape
    M, k = min(num_clusters, N), min(k, N)
    padded = [bool(mask[i]) if mask is not None else False for i in range(N)]
    real = [j for j in range(N) if not padded[j]]
    sq_dist = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(N)] for i in range(N)]
    d = [[math.sqrt(sq_dist[i][j] / C) for j in range(N)] for i in range(N)]  # Eq. 2, scaled by 1/sqrt(C)
    rho = []
    for i in range(N):  # Eq. 3; the token itself is its nearest neighbour (distance 0)
        neighbours = sorted(sq_dist[i][j] for j in real)[:k]
        rho.append(math.exp(-sum(neighbours) / (len(neighbours) * C)) if neighbours else 0.0)

    def denser(j, i):  # total order: higher density first, ties by lower index
        return not padded[j] and (rho[j] > rho[i] or (rho[j] == rho[i] and j < i))

    delta = []
    for i in range(N):
        above = [d[i][j] for j in range(N) if denser(j, i)]
        delta.append(min(above) if above else max(d[i][j] for j in real))
    score = [-math.inf if padded[i] else rho[i] * delta[i] for i in range(N)]  # padding fills in token order
    ranking = sorted(range(N), key=lambda i: (padded[i], -score[i], i))
    centres = sorted(ranking[:M])
    ids = []
    for i in range(N):
        ids.append(min(range(M), key=lambda c: (d[i][centres[c]], c)))
    for c, i in enumerate(centres):
        ids[i] = c
    return torch.tensor(ids), torch.tensor(centres), torch.tensor(rho), torch.tensor(delta)


def merge_reference(x, ids, num_clusters, scores=None):
    """Eq. 5 for one image with a loop over clusters. x: N x C."""
    out = torch.zeros(num_clusters, x.shape[1], dtype=torch.float64)
    for c in range(num_clusters):
        members = (ids == c).nonzero().flatten()
        if len(members) == 0:
            continue
        p = torch.ones(len(members), dtype=torch.float64) if scores is None else scores[members].double().exp()
        out[c] = ((p / p.sum())[:, None] * x[members].double()).sum(0)
    return out


def token2map_reference(tokens, index, grid_size, out_size):
    """Each cell takes its token's features, then the grid map is resized by adaptive average pooling."""
    B, _, C = tokens.shape
    cells = torch.stack([tokens[b, index[b]] for b in range(B)])
    return F.adaptive_avg_pool2d(cells.transpose(1, 2).reshape(B, C, *grid_size), out_size)


def map2token_reference(feature_map, index, grid_size, num_tokens):
    """The map is resized to the grid by adaptive average pooling; each token averages its cells."""
    B, C = feature_map.shape[:2]
    on_grid = F.adaptive_avg_pool2d(feature_map, grid_size).flatten(2)
    tokens = feature_map.new_zeros(B, num_tokens, C)
    for b in range(B):
        for m in range(num_tokens):
            cells = (index[b] == m).nonzero().flatten()
            if len(cells):
                tokens[b, m] = on_grid[b][:, cells].mean(-1)
    return tokens
