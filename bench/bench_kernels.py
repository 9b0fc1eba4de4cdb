"""Benchmark the packed-weight kernels against numpy float32 BLAS.

    python bench/bench_kernels.py                    # all types, 2 threads (a few minutes)
    python bench/bench_kernels.py --threads 1        # single core, kernels and BLAS alike
    python bench/bench_kernels.py --types Q4_0 F32 --quick
    python bench/bench_kernels.py --threads 2 --quick --types F32 Q4_0 Q4_K Q6_K --shapes 576x1536 1536x4096

Shapes (out x in): SmolLM2-135M's 1536x576 (gate/up), 576x1536 (down), 49152x576 (lm_head),
and 1536x4096 (a projection with 4096-wide rows, as in larger models). A type runs on a
shape only when the row length is a multiple of its block size: the K-quants (256-element
super-blocks) and the group-wise I4G128 / I3G128 (128-element groups) run on 576x1536 and
1536x4096 only (576 is a multiple of neither).

Weights: the legacy and float types are quantised from random normal weights with their
codecs; the K-quant types use random valid packed blocks (reference_kquants.random_blocks),
so the benchmark does not depend on the K-quant codecs (the kernels' speed does not depend
on the values).

matvec (decode): microseconds per call and GB/s of weight bytes read, for
- hot:  the same matrix again and again (it stays in L2/L3 when it fits), and
- cold: a rotation over enough copies that the working set is >= 3x the L3 cache, so the
        weights come from DRAM, as in a real decode step over a whole model.
"numpy" rows are numpy float32 ``W @ x`` (BLAS sgemv) on the same shape; "x" is
numpy time / kernel time (above 1 = faster than numpy float32).

matmul (prefill, T tokens): microseconds per call and GFLOP/s (2*T*out*in), against numpy
float32 ``X @ W.T`` (BLAS sgemm).

The numpy baselines run in a separate process: OpenBLAS worker threads busy-wait after
each call and would otherwise steal the cores from the numba threads being measured.
Times are medians of per-call timings (the host may be shared; medians ignore stalls);
on a busy host, ``--pct 10`` reports the 10th percentile instead (the kernel's own speed
when it got the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(1536, 576), (576, 1536), (49152, 576), (1536, 4096)]  # (out, in)
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "I4G128", "I3G128"]
KQUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
TOKENS = [7, 64, 512]
PCT = 50  # percentile of the per-call times reported (--pct)


def _set_threads(n: int | None) -> None:
    if n:
        for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(n)


def l3_bytes() -> int:
    try:
        for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (idx / "level").read_text().strip() == "3":
                s = (idx / "size").read_text().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return 32 << 20


def timeit(fn, min_time: float = 0.3, max_calls: int = 2000) -> float:
    """PCT-th percentile (default: median) of the seconds per call over >= min_time (at least
    5 calls, after one warm-up)."""
    fn()
    ts = []
    t_end = time.perf_counter() + min_time
    while len(ts) < 5 or (time.perf_counter() < t_end and len(ts) < max_calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[min(len(ts) - 1, len(ts) * PCT // 100)]


def rotating(fns):
    state = [0]

    def call():
        f = fns[state[0]]
        state[0] = (state[0] + 1) % len(fns)
        return f()

    return call


def copies_for(nbytes: int, l3: int) -> int:
    return max(2, -(-3 * l3 // nbytes))


def block_size(name: str) -> int:
    if name in KQUANTS:
        return 256
    from qconvert.blocks import by_name

    return by_name(name).block_size


def pack(name: str, W, rng):
    """Packed bytes of type ``name`` for the float32 matrix W (random blocks for K-quants)."""
    if name in KQUANTS:
        from qconvert.runtime.kernels.reference_kquants import random_blocks

        return random_blocks(rng, name, W.shape[0], W.shape[1])
    from qconvert.blocks import by_name

    return by_name(name).quantize(W)


def parse_shape(s: str) -> tuple[int, int]:
    out_f, in_f = s.lower().split("x")
    return int(out_f), int(in_f)


def numpy_baselines(quick: bool, tokens: list[int], shapes) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    l3 = l3_bytes()
    res = {}
    for out_f, in_f in shapes:
        W = rng.standard_normal((out_f, in_f)).astype(np.float32)
        x = rng.standard_normal(in_f).astype(np.float32)
        hot = timeit(lambda: W @ x)
        cold = None
        if not quick:
            cs = [W] + [W.copy() for _ in range(copies_for(W.nbytes, l3) - 1)]
            cold = timeit(rotating([lambda w=w: w @ x for w in cs]))
            del cs
        res[f"mv/{out_f}x{in_f}"] = (hot, cold)
        for T in tokens:
            X = rng.standard_normal((T, in_f)).astype(np.float32)
            res[f"mm/{out_f}x{in_f}/{T}"] = timeit(lambda: X @ W.T, min_time=0.5)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--quick", action="store_true", help="no cold runs, T=64 only")
    ap.add_argument("--threads", type=int, default=None, help="threads for numba and BLAS")
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--shapes", nargs="*", type=parse_shape, default=SHAPES, help="OUTxIN, e.g. 576x1536")
    ap.add_argument("--pct", type=int, default=50, help="percentile of per-call times (50: median)")
    ap.add_argument("--numpy-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PCT
    PCT = args.pct
    _set_threads(args.threads)
    tokens = [64] if args.quick else args.tokens

    if args.numpy_only:
        print(json.dumps(numpy_baselines(args.quick, tokens, args.shapes)))
        return

    cmd = [sys.executable, __file__, "--numpy-only", "--tokens", *map(str, tokens)]
    cmd += ["--shapes", *(f"{o}x{i}" for o, i in args.shapes)]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--pct", str(args.pct)]
    base = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numba

    from qconvert.runtime import kernels as K

    rng = np.random.default_rng(0)
    l3 = l3_bytes()
    print(
        f"# {os.cpu_count()} cores, numba {numba.__version__} with {numba.get_num_threads()} threads "
        f"({numba.config.THREADING_LAYER} layer requested), numpy {np.__version__}, L3 {l3 >> 20} MiB; "
        f"{'median' if PCT == 50 else f'{PCT}th percentile'} of per-call times"
    )

    print("\n## matvec (decode): us per call | GB/s of weight bytes | x = numpy float32 us / kernel us")
    head = f"{'type':6} {'out x in':>10} {'MiB':>7} | {'hot us':>8} {'GB/s':>6} {'x':>5}"
    if not args.quick:
        head += f" | {'cold us':>8} {'GB/s':>6} {'x':>5}"
    print(head)
    hot_us = {}
    for out_f, in_f in args.shapes:
        W = rng.standard_normal((out_f, in_f)).astype(np.float32)
        x = rng.standard_normal(in_f).astype(np.float32)
        hot_np, cold_np = base[f"mv/{out_f}x{in_f}"]
        shape = f"{out_f}x{in_f}"
        line = f"{'numpy':6} {shape:>10} {W.nbytes / 2**20:7.2f} | {hot_np * 1e6:8.1f} {W.nbytes / hot_np / 1e9:6.1f} {'':>5}"
        if cold_np is not None:
            line += f" | {cold_np * 1e6:8.1f} {W.nbytes / cold_np / 1e9:6.1f} {'':>5}"
        print(line, flush=True)
        for name in args.types:
            if in_f % block_size(name):
                continue
            raw = pack(name, W, rng)
            hot = timeit(lambda: K.linear(raw, name, x))
            hot_us[(name, shape)] = hot * 1e6
            line = f"{name:6} {shape:>10} {raw.nbytes / 2**20:7.2f} | {hot * 1e6:8.1f} {raw.nbytes / hot / 1e9:6.1f} {hot_np / hot:5.2f}"
            if cold_np is not None:
                cs = [raw] + [raw.copy() for _ in range(copies_for(raw.nbytes, l3) - 1)]
                cold = timeit(rotating([lambda r=r: K.linear(r, name, x) for r in cs]))
                del cs
                line += f" | {cold * 1e6:8.1f} {raw.nbytes / cold / 1e9:6.1f} {cold_np / cold:5.2f}"
            print(line, flush=True)

    pairs = [(a, b) for a, b in (("Q4_K", "Q4_0"), ("Q5_K", "Q5_0"), ("Q6_K", "Q8_0"), ("I4G128", "Q4_0"), ("I3G128", "Q4_0")) if a in args.types and b in args.types]
    if pairs:
        print("\n## K-quant / group-wise vs legacy matvec on the same shape (hot): us per call, ratio new / legacy")
        for a, b in pairs:
            for out_f, in_f in args.shapes:
                shape = f"{out_f}x{in_f}"
                if (a, shape) in hot_us and (b, shape) in hot_us:
                    ta, tb = hot_us[(a, shape)], hot_us[(b, shape)]
                    print(f"{a} {ta:8.1f} us vs {b} {tb:8.1f} us on {shape:>10}: {ta / tb:5.2f}x")

    print("\n## matmul (prefill): us per call | GFLOP/s | x = numpy float32 us / kernel us")
    print(f"{'type':6} {'out x in':>10} {'T':>4} | {'us':>9} {'GFLOP/s':>7} {'x':>5}")
    for out_f, in_f in args.shapes:
        W = rng.standard_normal((out_f, in_f)).astype(np.float32)
        shape = f"{out_f}x{in_f}"
        raws = {name: pack(name, W, rng) for name in args.types if in_f % block_size(name) == 0}
        for T in tokens:
            X = rng.standard_normal((T, in_f)).astype(np.float32)
            flop = 2.0 * T * out_f * in_f
            ref = base[f"mm/{out_f}x{in_f}/{T}"]
            print(f"{'numpy':6} {shape:>10} {T:4d} | {ref * 1e6:9.1f} {flop / ref / 1e9:7.1f} {'':>5}", flush=True)
            for name in raws:
                t = timeit(lambda: K.linear(raws[name], name, X), min_time=0.5)
                print(f"{name:6} {shape:>10} {T:4d} | {t * 1e6:9.1f} {flop / t / 1e9:7.1f} {ref / t:5.2f}", flush=True)


if __name__ == "__main__":
    main()
