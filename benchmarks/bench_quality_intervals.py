"""What the bootstrap intervals cost next to the FID/KID they accompany.

For a few sample sizes (the demo's 5 references x 16 generations in 64 CLIP features, and
larger sets), times `bootstrap.quality_intervals` (every number, 500 resamples) against
torchmetrics' FID + KID (100 subsets) of adapter and base on the same features: the part
of `quality_report` the intervals add to. Features are random (the cost does not depend on
their values). Prints one JSON object."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from mm_pipelines.models.diffusion.bootstrap import quality_intervals


class _Identity(torch.nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.num_features = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchmetrics(real: np.ndarray, fake: np.ndarray) -> None:
    dims = real.shape[1]
    r, f = torch.from_numpy(real), torch.from_numpy(fake)
    fid = FrechetInceptionDistance(feature=_Identity(dims)).double()
    fid.update(r, real=True)
    fid.update(f, real=False)
    fid.compute()
    subset = min(len(real), len(fake)) - 1
    kid = KernelInceptionDistance(feature=_Identity(dims), subsets=100, subset_size=subset)
    kid.update(r, real=True)
    kid.update(f, real=False)
    kid.compute()


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    results = []
    for n_real, n_gen, dims in ((5, 16, 64), (50, 100, 512), (200, 400, 512)):
        real = rng.normal(size=(n_real, dims))
        adapter, base = rng.normal(0.2, 1, (n_gen, dims)), rng.normal(0.6, 1, (n_gen, dims))
        clip_a, clip_b = rng.normal(30, 3, n_gen), rng.normal(25, 3, n_gen)
        boot = _best_of(
            lambda r=real, a=adapter, b=base, ca=clip_a, cb=clip_b: quality_intervals(
                r, a, b, ca, cb, resamples=500
            )
        )
        metrics = _best_of(
            lambda r=real, a=adapter, b=base: (_torchmetrics(r, a), _torchmetrics(r, b))
        )
        results.append(
            {
                "n_real": n_real,
                "n_generated": n_gen,
                "dims": dims,
                "resamples": 500,
                "intervals_s": round(boot, 3),
                "fid_kid_both_models_s": round(metrics, 3),
                "intervals_over_fid_kid": round(boot / metrics, 2),
            }
        )
    print(json.dumps({"benchmark": "quality_intervals", "threads": 1, "results": results}))


if __name__ == "__main__":
    main()
