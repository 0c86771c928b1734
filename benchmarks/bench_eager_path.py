"""The eager fast path (hot_kernels/_eager.py) against the torch.library ops it skips: the same
public calls, one process, hot_kernels._eager.ENABLED toggled between them, the two orders
alternated per round and a small torch op before every call (as between a model's layers).
Medians in microseconds; "ops / fast path" > 1 means the fast path is faster.

    python benchmarks/bench_eager_path.py              # fp32, the cpu backend, HoT-MixSTE and -MotionAGFormer shapes
    python benchmarks/bench_eager_path.py --rounds 41

Both paths run the same kernels and give bitwise the same results (tests/test_eager.py): the
difference is the Python and dispatcher work around each call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hot_kernels as hk
from hot_kernels import _eager


def cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 243, 512, generator=g)
    clip = torch.randn(1, 243, 17, 512, generator=g)
    pos = torch.randn(1, 81, 512, generator=g)
    S, L, M, C = 17, 243, 81, 128  # HoT-MotionAGFormer's TRA, B = 1

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    w = C ** -0.5
    tra = [param(1, L, C), param(S, M, C), param(C, C, scale=w), param(C), param(C, C, scale=w), param(C),
           param(C, C, scale=w), param(C), param(C, C, scale=w), param(C)]

    def tra_forward_backward():
        hk.token_recovering_attention(*tra, num_heads=4).sum().backward()

    return {
        "dpc_knn B=1 (243, 512) -> 81": lambda: hk.dpc_knn(x, 81, 2),
        "token_pruning_cluster B=1 (243, 17, 512) -> 81": lambda: hk.token_pruning_cluster(clip, 81, 2, pos_embed=pos),
        "TRA forward S=17 C=128 (grads on)": lambda: hk.token_recovering_attention(*tra, num_heads=4),
        "TRA forward+backward S=17 C=128": tra_forward_backward,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per case (each times both paths)")
    args = parser.parse_args(argv)
    between = (torch.ones(64, 64), torch.ones(64, 64))
    enabled = _eager.ENABLED
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu path {hk.cpu_isa()}")
    try:
        for name, fn in cases().items():
            times = {True: [], False: []}
            for r in range(args.rounds + 2):  # two warm-up rounds
                for fast in ((True, False) if r % 2 else (False, True)):
                    _eager.ENABLED = fast
                    torch.mm(*between)
                    t0 = time.perf_counter()
                    fn()
                    if r >= 2:
                        times[fast].append((time.perf_counter() - t0) * 1e6)
            ops, fast = statistics.median(times[False]), statistics.median(times[True])
            print(f"{name:48s} ops {ops:9.1f} us   fast path {fast:9.1f} us   ops / fast path {ops / fast:.2f}x",
                  flush=True)
    finally:
        _eager.ENABLED = enabled


if __name__ == "__main__":
    main()
