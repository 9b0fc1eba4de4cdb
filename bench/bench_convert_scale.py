"""Conversion at scale (issue #15): wall time, GB/min and peak RSS of `qconvert quantize` on
synthetic Llama-shape checkpoints (bf16, sharded safetensors, random weights), against the
memory bound 2 x the largest float32 tensor + 300 MB.

    python bench/bench_convert_scale.py --shape 1.1b --dir /tmp/h15 [--methods rtn4,q4_k_m,nf4] [--threads 1,2]

Checkpoints are generated once into --dir (never commit them); peak RSS is /usr/bin/time -v's
"Maximum resident set size" of the conversion process (apt-get install time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "1.1b": dict(hidden=2048, layers=22, inter=5632, heads=32, kv_heads=4, vocab=49152),
    "7b": dict(hidden=4096, layers=32, inter=11008, heads=32, kv_heads=32, vocab=32000),
}
METHODS = {"rtn4": ["--method", "rtn", "--bits", "4"], "q4_k_m": ["--method", "q4_k_m"], "nf4": ["--method", "nf4"]}
SHARD_BYTES = 2 << 30
TOKENIZER = Path("/work/shared/models/stories260K/tokenizer.json")


def llama_tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v, kv = s["hidden"], s["inter"], s["vocab"], s["kv_heads"] * (s["hidden"] // s["heads"])
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _write_bf16(f, shape: tuple[int, ...], rng: np.random.Generator, norm: bool, chunk: int = 1 << 24) -> None:
    n = math.prod(shape)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = np.ones(m, np.float32) if norm else rng.standard_normal(m, dtype=np.float32) * np.float32(0.02)
        f.write((x.view(np.uint32) >> 16).astype("<u2").tobytes())


def generate(shape: str, folder: Path, seed: int = 0) -> Path:
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    s = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in llama_tensors(s):
        nbytes = 2 * math.prod(shp)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shp in shard:
            header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + 2 * math.prod(shp)]}
            off += 2 * math.prod(shp)
            weight_map[name] = fname
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for name, shp in shard:
                _write_bf16(f, shp, rng, norm=name.endswith("norm.weight"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
              "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    if TOKENIZER.is_file():
        shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


def measure(folder: Path, out: Path, args: list[str], threads: int | None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "qconvert.cli", "quantize", str(folder), "-o", str(out),
           "--force", "--quiet", *args] + (["--threads", str(threads)] if threads else [])
    started = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    out.unlink(missing_ok=True)
    return {"seconds": wall, "peak_rss": rss_kb * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--dir", default="/tmp/h15")
    ap.add_argument("--methods", default="rtn4,q4_k_m,nf4")
    ap.add_argument("--source", default=None, help="convert this checkpoint (e.g. a GGUF export of the synthetic one)"
                    " instead; the shape still gives the sizes and the bound")
    ap.add_argument("--threads", default="", help="comma list of --threads values (empty: the default, all cores)")
    a = ap.parse_args()
    folder = Path(a.source) if a.source else generate(a.shape, Path(a.dir) / f"llama-{a.shape}-bf16")
    s = SHAPES[a.shape]
    src_bytes = sum(2 * math.prod(shp) for _, shp in llama_tensors(s))
    largest = max(4 * math.prod(shp) for _, shp in llama_tensors(s))
    bound = 2 * largest + 300e6
    print(f"{a.shape}: {src_bytes / 1e9:.2f} GB as bf16, largest tensor {largest / 1e6:.0f} MB as float32,"
          f" bound {bound / 1e6:.0f} MB, {os.cpu_count()} cores\n")
    kind = "gguf" if str(folder).endswith(".gguf") else "safetensors"
    print("| shape | source | method | threads | wall (s) | GB/min (bf16 in) | peak RSS (MB) | bound (MB) | within |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in a.methods.split(","):
        for t in ([int(x) for x in a.threads.split(",")] if a.threads else [None]):
            m = measure(folder, Path(a.dir) / f"out-{a.shape}-{method}.q", METHODS[method], t)
            print(f"| {a.shape} | {kind} | {method} | {t or 'all'} | {m['seconds']:.1f} | {src_bytes / 1e9 / (m['seconds'] / 60):.2f}"
                  f" | {m['peak_rss'] / 1e6:.0f} | {bound / 1e6:.0f} | {'yes' if m['peak_rss'] <= bound else 'NO'} |",
                  flush=True)


if __name__ == "__main__":
    main()
