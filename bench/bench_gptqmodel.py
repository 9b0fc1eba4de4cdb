"""qconvert's GPTQ against GPTQModel's on SmolLM2-135M: same F32 model, same calibration windows.

    GPTQMODEL_CPU_WORKERS=2 NUMBA_NUM_THREADS=2 python bench/bench_gptqmodel.py [--group auto|128|64|128,64]
        [--bits 4] [--damp 0.01] [--act-order] [--mse] [--sym] [--gar] [--chunks 20]
        [--work /tmp/qconvert-bench-gptqmodel]

1. The F32 reference is qconvert's import of the GGUF; GPTQModel gets the same weights as an HF
   fp32 folder (transformers' GGUF loader, ``save_pretrained``); the script checks that both
   give the same logits.
2. Calibration: ``qconvert.calibration.calibration_set`` on tinyshakespeare (16 windows of 512
   tokens, seed 0) -- the windows qconvert's GPTQ samples itself -- handed to GPTQModel as
   ``{"input_ids", "attention_mask"}`` rows.
3. GPTQ W4 (``--bits``), asymmetric (``--sym`` for symmetric), desc_act off (``--act-order``
   turns it on, and qconvert's ``act_order``), no range search (``--mse``: GPTQModel's
   ``mse=2.4`` and qconvert's ``mse=True``, the same 100-step grid shrinking to 0.2), damp 0.01
   (``--damp``), on both sides; qconvert's plain round-to-nearest at the same bits and group is
   a third row.
   GPTQModel turns on its group-aware reordering (``act_group_aware``) by default for GPTQ; it is
   off here so that both run plain GPTQ (``--gar`` adds a GPTQModel row with it on).
   Group: SmolLM2's hidden size 576 is not a multiple of 128. qconvert then uses 64 for those
   rows (128 for down_proj, 1536 wide); GPTQModel 7.6 accepts 128 and cuts each 576-wide row
   into groups of 128, 128, 128, 128 and 64 (fewer scales than qconvert's nine groups of 64), so
   ``--group 64`` is the like-for-like comparison. ``--group auto`` tries GPTQModel at 128 and
   falls back to 64 for BOTH if it refuses or fails, printing why; ``--group 128,64`` runs both.
   Each quantization runs in its own child process: wall time of the conversion (load,
   quantize, save) and the child's peak RSS (its VmHWM).
4. GPTQModel's checkpoint is imported as it is (``qconvert.quantize(folder, out)``, no
   re-quantization), and both containers are evaluated with the same runtime and protocol as
   bench/bench_quality.py: wiki.test.raw, windows of 512, second halves scored, KLD against F32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
GGUF_DIR = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf"
GGUF = GGUF_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"
SAMPLES, SEQLEN, SEED = 16, 512, 0


# --- children: one quantization each, timed, reporting JSON on their last stdout line -------


def child_qconvert(a: argparse.Namespace) -> dict:
    import qconvert

    t0 = time.perf_counter()
    r = qconvert.quantize(GGUF, a.out, method="gptq", bits=a.bits, group=a.group, sym=a.sym, calib=CALIB,
                          calib_samples=SAMPLES, calib_seqlen=SEQLEN, seed=SEED, damp=a.damp,
                          act_order=a.act_order, mse=a.mse, allow_requantize=True)
    return {"seconds": time.perf_counter() - t0, "convert_seconds": r.seconds}


def child_gptqmodel(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    t_import = time.perf_counter()
    from gptqmodel import GPTQModel, QuantizeConfig

    t_import = time.perf_counter() - t_import
    windows = np.load(a.calib_npy)
    calibration = [{"input_ids": torch.from_numpy(w).long().unsqueeze(0),
                    "attention_mask": torch.ones(1, w.shape[0], dtype=torch.long)} for w in windows]
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group, sym=a.sym, desc_act=a.act_order, damp_percent=a.damp,
                         act_group_aware=a.gar, mse=2.4 if a.mse else 0.0)
    t0 = time.perf_counter()
    model = GPTQModel.load(str(a.hf), cfg, device="cpu", dtype=torch.float32)
    model.quantize(calibration, batch_size=1, calibration_sort=None)
    model.save(str(a.out))
    return {"seconds": time.perf_counter() - t0, "import_seconds": t_import}


def _num(v: float, unit: str, digits: int = 1) -> str:
    return "–" if v != v else f"{v:.{digits}f} {unit}"  # NaN: not measured


def peak_rss_mib() -> float:
    """VmHWM of this process. (ru_maxrss from wait4 is no good here: Linux carries the forking
    parent's high-water mark across fork + exec, and the parent holds the F32 model.)"""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args: list[str], log: Path) -> tuple[dict | None, float, str]:
    """(result, process wall seconds, tail of the log) of one child process."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=f, stderr=subprocess.STDOUT)
        p.wait()
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    result = None
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            break
    tail = "\n".join(text.strip().splitlines()[-15:])
    return (result if p.returncode == 0 else None), wall, tail


# --- parent ------------------------------------------------------------------------------------


def make_hf_folder(hf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF.name)
    # the weights are dequantized to fp32 on load; the GGUF "quantizer" only blocks save_pretrained
    model.hf_quantizer = None
    for obj in (model, model.config):
        for attr in ("is_quantized", "quantization_method", "quantization_config"):
            if attr in getattr(obj, "__dict__", {}):
                delattr(obj, attr)
    model.save_pretrained(hf)
    tok.save_pretrained(hf)


def check_same_model(hf: Path, f32_container, tokens: list[int]) -> float:
    """Max |logit difference| between transformers on the HF folder and qconvert on the F32 import."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from qconvert.runtime.models import load_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ids = np.asarray(tokens[:128], dtype=np.int64)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(torch.from_numpy(ids).unsqueeze(0)).logits[0].numpy()
    ours = load_model(f32_container)
    q_logits = np.asarray(ours.forward(ids, ours.new_cache(len(ids)), all_logits=True), dtype=np.float32)
    return float(np.abs(hf_logits - q_logits).max())


def checkpoint_groups(folder: Path) -> str:
    """The group sizes of a GPTQ checkpoint's rows, per row width (from g_idx of layer 0)."""
    import numpy as np
    from safetensors import safe_open

    widths = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "np") as st:
            for k in st.keys():
                if k.startswith("model.layers.0.") and k.endswith(".g_idx"):
                    g = st.get_tensor(k)
                    sizes = np.bincount(g).tolist()  # e.g. [128, 128, 128, 128, 64]
                    runs = []
                    for size in sizes:
                        if runs and runs[-1][0] == size:
                            runs[-1][1] += 1
                        else:
                            runs.append([size, 1])
                    widths[len(g)] = " + ".join(f"{size} (×{n})" for size, n in runs)
    return "; ".join(f"{w} wide: {sizes}" for w, sizes in sorted(widths.items()))


def groups_of(container) -> str:
    """The group size of a container's group-wise matrices, per row width."""
    from qconvert.blocks.groupwise import parse_type

    widths = {}
    for info in container.tensors.values():
        parsed = parse_type(info.block_type.name)
        if parsed is not None:
            widths.setdefault(info.shape[-1], set()).add(parsed[1])
    return "; ".join(f"{w} wide: " + "/".join(map(str, sorted(g))) + f" (×{w // max(g)})"
                     for w, g in sorted(widths.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["qconvert", "gptqmodel"])
    ap.add_argument("--out")
    ap.add_argument("--hf")
    ap.add_argument("--calib-npy")
    ap.add_argument("--group", default="auto",
                    help="auto (128; 64 for both if GPTQModel fails at 128), or a list such as 128,64")
    ap.add_argument("--sym", action="store_true", help="symmetric on both sides (default: asymmetric)")
    ap.add_argument("--gar", action="store_true", help="also run GPTQModel with act_group_aware (its GPTQ default)")
    ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true", help="desc_act / act_order on both sides")
    ap.add_argument("--mse", action="store_true", help="the range search on both sides (GPTQModel mse=2.4)")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--work", default="/tmp/qconvert-bench-gptqmodel")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if a.child:  # one quantization in this process
        a.group = int(a.group)
        a.out = Path(a.out)
        a.hf = a.hf and Path(a.hf)
        res = child_qconvert(a) if a.child == "qconvert" else child_gptqmodel(a)
        res["peak_rss_mib"] = peak_rss_mib()
        print("RESULT " + json.dumps(res), flush=True)
        return

    import numpy as np

    import qconvert
    from qconvert.calibration import calibration_set
    from qconvert.evaluate import evaluate, make_windows, read_text, reference_logprobs
    from qconvert.runtime.models import load_model
    from qconvert.runtime.tokenizer import Tokenizer

    sym_name = "sym" if a.sym else "asym"
    flags = ("-ao" if a.act_order else "") + ("-mse" if a.mse else "")
    extra = (["--act-order"] if a.act_order else []) + (["--mse"] if a.mse else [])
    print(f"GPTQ W{a.bits} {sym_name}, desc_act {'on' if a.act_order else 'off'}, mse {'2.4' if a.mse else 'off'}, damp {a.damp}, calibration: {SAMPLES} windows of {SEQLEN} "
          f"tokens of {CALIB.name} (seed {SEED}); evaluation: {a.chunks} windows of 512 of {WIKI.name}\n")
    try:
        import gptqmodel  # noqa: F401

        have_gptqmodel, why = True, ""
        gptqmodel_version = getattr(gptqmodel, "__version__", "?")
    except Exception as e:  # ImportError, or a broken install
        have_gptqmodel, why = False, f"{type(e).__name__}: {e}"
        gptqmodel_version = None
    if not have_gptqmodel:
        print(f"GPTQModel not installed (import gptqmodel failed: {why}): no reference run; "
              "qconvert's GPTQ alone is measured below.\n")

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "smollm2.f32.q"
    if not f32.exists():
        qconvert.quantize(GGUF, f32, method="f32")

    with qconvert.load(f32) as c:
        tok = Tokenizer.from_container(c)
        cal = calibration_set(tok, CALIB, n_samples=SAMPLES, seqlen=SEQLEN, seed=SEED)
        tokens = tok.encode(read_text(WIKI), add_bos=False)
        bos = tok.bos_id if tok.add_bos_default else None
        ref_model = load_model(c)
        cache = work / f"f32_logprobs_{a.chunks}.npz"  # the F32 reference, computed once per --chunks
        if cache.exists():
            z = np.load(cache)
            ref_logp = [z[f"w{i}"] for i in range(len(z.files) - 1)]
            ref_ppl = float(z["ppl"])
        else:
            ref_logp = reference_logprobs(ref_model, tokens, 512, a.chunks, bos)
            windows = make_windows(tokens, 512, a.chunks, bos)
            nll = [-lp[np.arange(255), w[257:]] for lp, w in zip(ref_logp, windows)]
            ref_ppl = float(np.exp(np.concatenate(nll).mean()))
            np.savez(cache, ppl=ref_ppl, **{f"w{i}": x for i, x in enumerate(ref_logp)})
        del ref_model
    # the windows qconvert's GPTQ samples from the GGUF source itself must be these
    from qconvert.methods.calibrated import _tokenizer_for
    from qconvert.sources import open_source

    with open_source(str(GGUF)) as src:
        own = calibration_set(_tokenizer_for(src), CALIB, n_samples=SAMPLES, seqlen=SEQLEN, seed=SEED)
    assert np.array_equal(own.tokens, cal.tokens), "calibration windows differ between the F32 container and the GGUF"
    calib_npy = work / "calib_windows.npy"
    np.save(calib_npy, cal.tokens)
    print(f"calibration windows: {cal.tokens.shape}, sha256 of text {cal.info['text_sha256'][:12]}…, "
          f"first tokens {cal.tokens[0, :6].tolist()}")
    print(f"F32 import: PPL {ref_ppl:.4f} over {len(ref_logp)} windows\n")

    groups = [128] if a.group == "auto" else [int(g) for g in a.group.split(",")]
    notes = []
    hf = work / "smollm2-hf"
    if have_gptqmodel:
        if not (hf / "config.json").exists():
            make_hf_folder(hf)
        with qconvert.load(f32) as c:
            diff = check_same_model(hf, c, tokens)
        print(f"HF fp32 folder (transformers from the GGUF) vs qconvert F32 import: max |Δ logit| {diff:.2e} "
              "over 128 wiki tokens\n")

    def gptqmodel_run(g: int, gar: bool):
        out = work / f"gptqmodel-w{a.bits}g{g}-{sym_name}-d{a.damp:g}{flags}{'-gar' if gar else ''}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        args = ["--child", "gptqmodel", "--out", str(out), "--hf", str(hf), "--calib-npy", str(calib_npy),
                "--group", str(g), "--bits", str(a.bits), "--damp", str(a.damp)] + extra + (["--sym"] if a.sym else []) + (["--gar"] if gar else [])
        res, wall, tail = run_child(args, work / f"{out.name}.log")
        return out, res, wall, tail

    rows = []  # (group, method, container, child result, process seconds, groups text)
    i = 0
    while i < len(groups):
        group = groups[i]
        i += 1
        runs = []
        if have_gptqmodel:
            out, res, wall, tail = gptqmodel_run(group, False)
            if res is None and a.group == "auto" and group == 128:
                print(f"GPTQModel at group 128 failed; using group 64 for BOTH sides. Its output ended with:\n{tail}\n")
                notes.append("GPTQModel failed at group 128 (log above): both sides use group 64")
                groups.append(64)
                continue
            if res is None:
                print(f"GPTQModel failed at group {group}; its output ended with:\n{tail}\n")
            else:
                runs.append((f"GPTQModel {gptqmodel_version} GPTQ", out, res, wall))
            if a.gar:
                out, res, wall, tail = gptqmodel_run(group, True)
                if res is None:
                    print(f"GPTQModel with act_group_aware failed; its output ended with:\n{tail}\n")
                else:
                    runs.append((f"GPTQModel {gptqmodel_version} GPTQ + act_group_aware", out, res, wall))

        out = work / f"qconvert-w{a.bits}g{group}-{sym_name}-d{a.damp:g}{flags}.q"
        args = ["--child", "qconvert", "--out", str(out), "--group", str(group), "--bits", str(a.bits), "--damp", str(a.damp)] + extra + (["--sym"] if a.sym else [])
        res, wall, tail = run_child(args, work / f"{out.name}.log")
        if res is None:
            print(f"qconvert GPTQ failed at group {group}; its output ended with:\n{tail}\n")
        else:
            rows.append((group, "qconvert GPTQ", out, res, wall, ""))
        out = work / f"qconvert-rtn-w{a.bits}g{group}-{sym_name}.q"
        t0 = time.perf_counter()
        qconvert.quantize(GGUF, out, method="rtn", bits=a.bits, group=group, sym=a.sym, allow_requantize=True)
        rows.append((group, "qconvert RTN", out, {"seconds": time.perf_counter() - t0, "peak_rss_mib": float("nan")},
                     float("nan"), ""))
        for name, folder, res, wall in runs:
            imported = work / f"{folder.name}.imported.q"
            try:
                qconvert.quantize(folder, imported)
            except qconvert.QConvertError as e:
                print(f"{name}: qconvert cannot import its checkpoint: {e}")
                continue
            rows.append((group, name, imported, res, wall, checkpoint_groups(folder)))

    print("SmolLM2's q/k/v/o/gate/up rows are 576 wide (not a multiple of 128), down_proj rows 1536.\n")
    print("| group | method | groups (row width: group sizes) | PPL | PPL(Q)/PPL(F32) | mean KLD | same top-1 "
          "| quantize wall time | process wall time | peak RSS |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| – | F32 import | – | {ref_ppl:.4f} | 1.0000 | – | – | – | – | – |")
    for group, name, path, res, wall, gtext in rows:
        with qconvert.load(path) as c:
            gtext = gtext or groups_of(c)
            r = evaluate(load_model(c), tokens, 512, a.chunks, bos, reference_logp=ref_logp)
        x = r.reference
        print(f"| {group} | {name} | {gtext} | {r.ppl:.4f} | {r.ppl / ref_ppl:.4f} | {x['kld_mean']:.5f} "
              f"| {100 * x['top1_agreement']:.2f}% | {res['seconds']:.1f} s | {_num(wall, 's')} "
              f"| {_num(res['peak_rss_mib'], 'MiB', 0)} |", flush=True)
    print("\nquantize wall time: inside the child, load + calibrate + quantize + save (qconvert from the GGUF, "
          "GPTQModel from the HF fp32 folder); process wall time adds interpreter start and imports; "
          "peak RSS: VmHWM of the child process. GPTQModel checkpoints are evaluated after a lossless "
          "import into a container (qconvert.quantize(folder, out)), by the same runtime as qconvert's.")
    for n in notes:
        print("note: " + n)
    if not have_gptqmodel:
        print(f"\nGPTQModel not installed ({why}): no GPTQModel rows.")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
