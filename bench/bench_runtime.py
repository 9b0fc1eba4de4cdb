"""Runtime speed and memory on SmolLM2-135M: qconvert run vs PyTorch fp32 (and llama.cpp if installed).

    python bench/bench_runtime.py [--work /tmp/qconvert-bench] [--prompt-tokens 512] [--gen-tokens 128]

Prints a Markdown table (paste it into BENCHMARKS.md with this command line). Every row is
measured in the same run, one process per measurement, on 2 threads:
- qconvert: `qconvert run MODEL --json` in a fresh process (numba's on-disk cache warmed by
  a first run); prompt = the first N tokens of wiki.test.raw; peak RSS from wait4().
- PyTorch fp32: transformers loads the same GGUF dequantized to fp32; `generate` greedy with
  max_new_tokens=1 (prompt time) and 1+M (decode time = difference).
- llama.cpp (llama-cpp-python, when importable): the GGUF exported by `qconvert export`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
THREADS = 2


def child_rss(cmd: list[str], env: dict) -> tuple[dict, int]:
    """Run a JSON-printing command; return (its JSON, its peak RSS)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()
    errs = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{errs.decode()}")
    return json.loads(out), usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/qconvert-bench")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NUMBA_NUM_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS)}
    py = sys.executable

    sys.path.insert(0, str(REPO))
    import qconvert
    from qconvert.runtime.tokenizer import Tokenizer

    variants = {"F32": dict(method="f32"), "Q8_0": dict(method="rtn", bits=8), "Q4_0": dict(method="rtn", bits=4)}
    files = {}
    for name, kw in variants.items():
        path = work / f"smollm2.{name.lower()}.q"
        if not path.exists():
            qconvert.quantize(GGUF, path, **kw, allow_requantize=True)
        files[name] = path

    with qconvert.load(files["F32"]) as c:
        tok = Tokenizer.from_container(c)
    ids = tok.encode(WIKI.read_text().replace("\r\n", "\n")[:20000], add_bos=False)[: args.prompt_tokens]
    prompt = tok.decode(ids)
    assert len(tok.encode(prompt)) == args.prompt_tokens, "prompt does not re-tokenize to the same length"

    rows = []
    for name, path in files.items():
        cmd = [py, "-m", "qconvert", "run", str(path), "--prompt", prompt, "--max-tokens", str(args.gen_tokens), "--json"]
        child_rss(cmd[:-3] + ["--max-tokens", "4", "--json"], env)  # warm numba's cache for this type
        best = None
        for _ in range(2):
            result, rss = child_rss(cmd, env)
            if best is None or result["decode_tokens_per_s"] > best[0]["decode_tokens_per_s"]:
                best = (result, rss)
        result, rss = best
        rows.append((f"qconvert {name}", result["prompt_tokens_per_s"], result["decode_tokens_per_s"],
                     rss, path.stat().st_size))

    torch_script = f"""
import json, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({THREADS})
m = AutoModelForCausalLM.from_pretrained({str(GGUF.parent)!r}, gguf_file={GGUF.name!r}, dtype=torch.float32).eval()
ids = torch.tensor([{ids!r}])
def gen(n):
    t = time.perf_counter()
    m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
    return time.perf_counter() - t
gen(2)
t1 = min(gen(1) for _ in range(2))
tn = min(gen({args.gen_tokens} + 1) for _ in range(2))
print(json.dumps({{"prompt_tokens_per_s": {args.prompt_tokens} / t1, "decode_tokens_per_s": {args.gen_tokens} / (tn - t1)}}))
"""
    result, rss = child_rss([py, "-c", torch_script], env)
    rows.append(("PyTorch fp32 (transformers generate)", result["prompt_tokens_per_s"], result["decode_tokens_per_s"], rss, None))

    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
    if have_llama:
        for name in ("F32", "Q8_0", "Q4_0"):
            gguf_path = work / f"smollm2.{name.lower()}.gguf"
            if not gguf_path.exists():
                with qconvert.load(files[name]) as c:
                    from qconvert.export.gguf import export_gguf

                    export_gguf(c, gguf_path)
            script = f"""
import json, time, llama_cpp
llm = llama_cpp.Llama({str(gguf_path)!r}, n_ctx=1024, n_threads={THREADS}, n_batch=512, verbose=False)
ids = {ids!r}
t = time.perf_counter(); llm.eval(ids); tp = time.perf_counter() - t
tok = llm.sample(temp=0.0)
t = time.perf_counter()
for _ in range({args.gen_tokens}):
    llm.eval([tok]); tok = llm.sample(temp=0.0)
td = time.perf_counter() - t
print(json.dumps({{"prompt_tokens_per_s": len(ids) / tp, "decode_tokens_per_s": {args.gen_tokens} / td}}))
"""
            result, rss = child_rss([py, "-c", script], env)
            rows.append((f"llama.cpp {name} (same GGUF export)", result["prompt_tokens_per_s"],
                         result["decode_tokens_per_s"], rss, gguf_path.stat().st_size))

    torch_decode = next(r[2] for r in rows if r[0].startswith("PyTorch"))
    print(f"SmolLM2-135M-Instruct, {THREADS} threads, prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated (greedy)\n")
    print("| runtime | file | prompt tokens/s | decode tokens/s | decode vs PyTorch fp32 | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, pp, tg, rss, size in rows:
        size_s = f"{size / 2**20:.0f} MiB" if size else "–"
        print(f"| {name} | {size_s} | {pp:.1f} | {tg:.1f} | {tg / torch_decode:.2f}× | {rss / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
