"""Importing GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM) checkpoints without re-quantization.

The checkpoints are built here by packing known integers into the documented layouts
(ANCHORS A4) with packers written independently of the importer's unpacker: AutoGPTQ's
row-by-row shift loops (its 3-bit 10+1+10+1+10 loop transcribed), GPTQModel's v2 -> v1 word
subtraction, AutoAWQ's interleaved nibbles. The container must hold exactly
``(q - zero) * scale`` and the runtime must match a float model built from those weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import qconvert
from qconvert.errors import QConvertError
from qconvert.runtime.models import load_model
from tests.conftest import make_hf_folder, tiny_llama_config, tiny_llama_tensors, write_safetensors

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = np.array([1, 17, 5, 60, 33, 2, 95, 40, 7, 12])


# --- independent packers ----------------------------------------------------------------


def gptq_pack_rows(intw: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ QuantLinear.pack: intweight (in, out) -> qweight (in * bits / 32, out) uint32."""
    intw = intw.astype(np.uint32)
    qweight = np.zeros((intw.shape[0] // 32 * bits, intw.shape[1]), np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intw[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # bits == 3
            for j in range(i, i + 10):
                qweight[row] |= intw[j] << np.uint32(3 * (j - i))
            i += 10
            qweight[row] |= intw[i] << np.uint32(30)
            row += 1
            qweight[row] |= (intw[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intw[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            qweight[row] |= intw[i] << np.uint32(31)
            row += 1
            qweight[row] |= (intw[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intw[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def gptq_pack_cols(zeros: np.ndarray, bits: int) -> np.ndarray:
    """qzeros packing (groups, out) -> (groups, out * bits / 32): the row packer along the columns."""
    return np.ascontiguousarray(gptq_pack_rows(np.ascontiguousarray(zeros.T), bits).T)


def gptq_qzeros(zeros: np.ndarray, bits: int, fmt: str) -> np.ndarray:
    """gptq_v2: zeros as they are; gptq (v1): GPTQModel's convert_gptq_v2_to_v1_format (packed words minus
    0x11111111 for 4 bits, a zero of 0 borrowing from the next field; 3 bits field by field, modulo 8)."""
    if fmt == "gptq_v2":
        return gptq_pack_cols(zeros, bits)
    if bits == 3:
        return gptq_pack_cols((zeros.astype(np.int64) - 1) % 8, bits)
    words = gptq_pack_cols(zeros, bits)
    return words - np.uint32(sum(1 << (bits * j) for j in range(32 // bits)))  # wraps modulo 2**32


def awq_pack(intw: np.ndarray) -> np.ndarray:
    """AutoAWQ WQLinear_GEMM: (rows, out) 4-bit ints -> (rows, out / 8), slot i = column 8c + ORDER[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    intw = intw.astype(np.uint32)
    out = np.zeros((intw.shape[0], intw.shape[1] // 8), np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= intw[:, c * 8 + order[i]] << np.uint32(4 * i)
    return out


# --- checkpoint builders ----------------------------------------------------------------


def _entry(arr: np.ndarray, dtype: str):
    np_dtype = {"I32": "<i4", "F16": "<f2", "F32": "<f4"}[dtype]
    return dtype, arr.shape, np.ascontiguousarray(arr).astype(np_dtype, copy=False).tobytes()


def _floats(seed: int) -> dict[str, np.ndarray]:
    t = tiny_llama_tensors(seed=seed)
    return {n: v for n, v in t.items() if not any(f".{lin}." in n for lin in LINEARS)}


def _linears(rng, bits: int, group: int, act_order: bool):
    """(name prefix, q (out, in), zeros (groups, out), scales f16 (groups, out), g_idx (in,)) per linear."""
    cfg = tiny_llama_config()
    h, inter, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h), "self_attn.v_proj": (kv * hd, h),
              "self_attn.o_proj": (h, heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    maxq = (1 << bits) - 1
    out = []
    for layer in range(cfg["num_hidden_layers"]):
        for lin in LINEARS:
            o, i = shapes[lin]
            G = i if group == -1 else group
            ng = -(-i // G)
            q = rng.integers(0, maxq + 1, (o, i))
            zeros = rng.integers(0, maxq + 1, (ng, o))
            zeros[0, :4] = [0, maxq, 0, 1]  # the v1 edge cases: a zero of 0 (borrow) and of maxq
            scales = rng.uniform(0.002, 0.02, (ng, o)).astype(np.float16)
            if act_order:  # GPTQ desc_act: the k-th column in activation order is in group k // G
                order = rng.permutation(i)
                g_idx = np.empty(i, np.int32)
                g_idx[order] = np.arange(i) // G
            else:
                g_idx = (np.arange(i) // G).astype(np.int32)
            out.append((f"model.layers.{layer}.{lin}", q, zeros, scales, g_idx))
    return out


def expected_weight(q, zeros, scales, g_idx) -> np.ndarray:
    """(q - zero) * scale, float32 (exact: a small integer times an f16)."""
    z = zeros[g_idx].T.astype(np.float32)
    s = scales[g_idx].T.astype(np.float32)
    return (q.astype(np.float32) - z) * s


def make_gptq(folder: Path, bits=4, group=32, act_order=False, fmt="gptq", seed=0, write_g_idx=True,
              legacy_config=False, extra_cfg=None) -> dict[str, np.ndarray]:
    """A GPTQ checkpoint folder; returns the expected dequantized weights by container name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {n: _entry(v.astype(np.float16), "F16") for n, v in _floats(seed).items()}
    expected = {}
    for prefix, q, zeros, scales, g_idx in _linears(rng, bits, group, act_order):
        tensors[prefix + ".qweight"] = _entry(gptq_pack_rows(q.T, bits).view(np.int32), "I32")
        tensors[prefix + ".qzeros"] = _entry(gptq_qzeros(zeros, bits, fmt).view(np.int32), "I32")
        tensors[prefix + ".scales"] = _entry(scales, "F16")
        if write_g_idx:
            tensors[prefix + ".g_idx"] = _entry(g_idx, "I32")
        expected[prefix + ".weight"] = expected_weight(q, zeros, scales, g_idx)
    for n, v in _floats(seed).items():
        expected[n] = v.astype(np.float16).astype(np.float32)
    write_safetensors(folder / "model.safetensors", tensors)
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": fmt,
            **(extra_cfg or {})}
    config = tiny_llama_config()
    if legacy_config:  # AutoGPTQ before transformers integration: quantize_config.json only
        (folder / "quantize_config.json").write_text(json.dumps({k: v for k, v in qcfg.items() if k != "quant_method"}))
    else:
        config["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(config))
    return expected


def make_awq(folder: Path, group=32, seed=0, extra_cfg=None) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {n: _entry(v.astype(np.float16), "F16") for n, v in _floats(seed).items()}
    expected = {}
    for prefix, q, zeros, scales, g_idx in _linears(rng, 4, group, False):
        tensors[prefix + ".qweight"] = _entry(awq_pack(q.T).view(np.int32), "I32")
        tensors[prefix + ".qzeros"] = _entry(awq_pack(zeros).view(np.int32), "I32")
        tensors[prefix + ".scales"] = _entry(scales, "F16")
        expected[prefix + ".weight"] = expected_weight(q, zeros, scales, g_idx)
    for n, v in _floats(seed).items():
        expected[n] = v.astype(np.float16).astype(np.float32)
    write_safetensors(folder / "model.safetensors", tensors)
    config = tiny_llama_config()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm", **(extra_cfg or {})}
    (folder / "config.json").write_text(json.dumps(config))
    return expected


def float_reference(tmp_path: Path, expected: dict[str, np.ndarray]) -> Path:
    """An F32 container of the expected weights: the float model the runtime must match."""
    folder = make_hf_folder(tmp_path / "reference-hf", tensors=expected)
    out = tmp_path / "reference.q"
    qconvert.quantize(folder, out, method="f32")
    return out


def logits(path: Path) -> np.ndarray:
    with qconvert.load(path) as c:
        m = load_model(c)
        return m.forward(IDS, m.new_cache(16))


def check_container(path: Path, expected: dict[str, np.ndarray], permuted: bool) -> None:
    seen_perm = False
    with qconvert.load(path) as c:
        for name, want in expected.items():
            info = c.tensors[name]
            stored = c.tensor(name)
            if name.endswith("_proj.weight"):
                assert info.block_type.name.startswith("I"), (name, info.block_type.name)
                perm = info.extra.get("input_perm")
                if perm is not None:
                    seen_perm = True
                    stored_want = want[:, np.asarray(perm)]
                else:
                    stored_want = want
                np.testing.assert_array_equal(stored, stored_want, err_msg=name)
            else:
                np.testing.assert_array_equal(stored.reshape(want.shape), want, err_msg=name)
    assert seen_perm == permuted


# --- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group,act_order,fmt", [
    (4, 32, False, "gptq"),
    (4, 32, True, "gptq"),
    (4, 64, False, "gptq_v2"),
    (2, 32, True, "gptq"),
    (3, 32, False, "gptq"),
    (3, 64, True, "gptq_v2"),
    (8, 32, False, "gptq"),
    (4, -1, False, "gptq"),
])
def test_gptq_import_is_exact_and_runs(tmp_path, bits, group, act_order, fmt):
    expected = make_gptq(tmp_path / "gptq", bits=bits, group=group, act_order=act_order, fmt=fmt)
    out = tmp_path / "imported.q"
    qconvert.quantize(tmp_path / "gptq", out)  # the default method imports as-is
    check_container(out, expected, permuted=act_order)
    with qconvert.load(out) as c:
        assert c.recipe["method"] == "import" and c.recipe["from"] == "gptq"
        assert c.recipe["bits"] == bits and c.recipe["group"] == group and c.recipe["desc_act"] == act_order
        assert c.recipe["format"] == fmt
        assert c.source["quantized"] is True and c.source["quantization_config"]["bits"] == bits
        assert "quantization_config" not in c.config
        q_type = c.tensors["model.layers.0.self_attn.q_proj.weight"].block_type.name
        assert q_type == f"I{bits}G{64 if group == -1 else group}"  # per-channel: hidden 64 -> blocks of 64
        assert c.tensors["model.layers.0.mlp.down_proj.weight"].block_type.name == f"I{bits}G{128 if group == -1 else group}"
        assert c.tensors["model.embed_tokens.weight"].block_type.name == "F16"
    ref = float_reference(tmp_path, expected)
    assert np.abs(logits(out) - logits(ref)).max() <= 1e-4


def test_awq_import_is_exact_and_runs(tmp_path):
    expected = make_awq(tmp_path / "awq", group=32)
    out = tmp_path / "imported.q"
    qconvert.quantize(tmp_path / "awq", out, method="import")
    check_container(out, expected, permuted=False)
    with qconvert.load(out) as c:
        assert c.recipe["method"] == "import" and c.recipe["from"] == "awq" and c.recipe["format"] == "gemm"
        assert c.recipe["groups_used"] == [32]
    ref = float_reference(tmp_path, expected)
    assert np.abs(logits(out) - logits(ref)).max() <= 1e-4


def test_awq_without_zero_point_flag_still_uses_its_qzeros(tmp_path):
    """GPTQModel's symmetric AWQ writes zero_point: false and stores the zeros (8) in qzeros anyway."""
    expected = make_awq(tmp_path / "awq", group=32, extra_cfg={"zero_point": False})
    out = tmp_path / "imported.q"
    qconvert.quantize(tmp_path / "awq", out)
    check_container(out, expected, permuted=False)
    with qconvert.load(out) as c:
        assert c.recipe["zero_point"] is False and c.recipe["sym"] is True


def test_stale_quantize_config_beside_float_weights_is_a_float_checkpoint(tmp_path):
    folder = make_hf_folder(tmp_path / "float")
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "quant_method": "gptq"}))
    qconvert.quantize(folder, tmp_path / "x.q", method="f32")
    with qconvert.load(tmp_path / "x.q") as c:
        assert c.source["quantized"] is False and c.recipe["method"] == "f32"


def test_v1_zero_minus_one_per_field_autogptq_style(tmp_path):
    """AutoGPTQ's own v1 writer subtracts 1 per field (zeros >= 1): the same words as GPTQModel's."""
    rng = np.random.default_rng(3)
    zeros = rng.integers(1, 16, (4, 64))
    assert np.array_equal(gptq_pack_cols(zeros - 1, 4), gptq_qzeros(zeros, 4, "gptq"))


def test_legacy_quantize_config_json_and_missing_g_idx(tmp_path):
    expected = make_gptq(tmp_path / "gptq", bits=4, group=32, write_g_idx=False, legacy_config=True)
    out = tmp_path / "imported.q"
    qconvert.quantize(tmp_path / "gptq", out)
    check_container(out, expected, permuted=False)


def test_source_load_gives_model_order_and_other_methods_requantize(tmp_path):
    expected = make_gptq(tmp_path / "gptq", bits=4, group=32, act_order=True)
    qconvert.quantize(tmp_path / "gptq", tmp_path / "f32.q", method="f32")  # dequantize
    with qconvert.load(tmp_path / "f32.q") as c:
        for name, want in expected.items():
            np.testing.assert_array_equal(c.tensor(name).reshape(want.shape), want, err_msg=name)
        assert c.recipe["method"] == "f32"
    qconvert.quantize(tmp_path / "gptq", tmp_path / "q8.q", method="rtn", bits=8, allow_requantize=True)
    with qconvert.load(tmp_path / "q8.q") as c:
        name = "model.layers.1.mlp.down_proj.weight"
        assert c.tensors[name].block_type.name == "Q8_0"
        np.testing.assert_allclose(c.tensor(name), expected[name], atol=2e-3)


def test_tensor_type_override_requantizes_from_dequantized_weights(tmp_path):
    expected = make_gptq(tmp_path / "gptq", bits=4, group=32, act_order=True)
    out = tmp_path / "mixed.q"
    qconvert.quantize(tmp_path / "gptq", out, tensor_types=["down_proj=f32"])
    with qconvert.load(out) as c:
        name = "model.layers.0.mlp.down_proj.weight"
        assert c.tensors[name].block_type.name == "F32" and not c.tensors[name].extra
        np.testing.assert_array_equal(c.tensor(name), expected[name])
        assert c.tensors["model.layers.0.mlp.up_proj.weight"].block_type.name == "I4G32"


def test_import_method_needs_a_quantized_checkpoint(tmp_path):
    make_hf_folder(tmp_path / "float")
    with pytest.raises(QConvertError, match="--method import needs a GPTQ or AWQ checkpoint"):
        qconvert.quantize(tmp_path / "float", tmp_path / "x.q", method="import")


@pytest.mark.parametrize("maker,cfg,match", [
    ("gptq", {"checkpoint_format": "marlin"}, "format 'marlin'.*kernel-specific"),
    ("gptq", {"format": "gptq_p"}, "format 'gptq_p'"),
    ("gptq", {"is_marlin_format": True}, "Marlin-format"),
    ("gptq", {"bits": 5}, "5-bit GPTQ cannot be imported"),
    ("gptq", {"pack_dtype": "int16"}, "packed in int16 words"),
    ("gptq", {"dynamic": {"+:.*down_proj": {"bits": 8}}}, "per-module quantization overrides"),
    ("gptq", {"quant_method": "bitsandbytes"}, r"already quantized \(bitsandbytes\)"),
    ("awq", {"version": "gemv"}, "AWQ version 'gemv'"),
    ("awq", {"version": "exllama"}, "AWQ version 'exllama'"),
    ("awq", {"bits": 8}, "8-bit AWQ"),
])
def test_unsupported_variants_are_refused_clearly(tmp_path, maker, cfg, match):
    (make_gptq if maker == "gptq" else make_awq)(tmp_path / "ckpt", extra_cfg=cfg)
    with pytest.raises(QConvertError, match=match):
        qconvert.quantize(tmp_path / "ckpt", tmp_path / "x.q")


def test_g_idx_groups_that_blocks_cannot_hold_are_refused(tmp_path):
    folder = tmp_path / "gptq"
    make_gptq(folder, bits=4, group=32, act_order=True)
    # rewrite one g_idx: groups of 16 and 48 columns cannot be cut into blocks of 32
    from qconvert.sources.hf import _SafetensorsFile

    f = _SafetensorsFile(folder / "model.safetensors")
    tensors = {}
    for name, (dtype, shape, _, _) in f.entries.items():
        tensors[name] = (dtype, shape, f.read(name).tobytes())
    f.close()
    g = np.array([0] * 16 + [1] * 48, np.int32)
    tensors["model.layers.0.self_attn.q_proj.g_idx"] = ("I32", (64,), g.tobytes())
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(QConvertError, match="q_proj: GPTQ g_idx with groups of 16, 48 input columns"):
        qconvert.quantize(folder, tmp_path / "x.q")


def test_incomplete_module_is_refused(tmp_path):
    folder = tmp_path / "gptq"
    make_gptq(folder, bits=4, group=32)
    from qconvert.sources.hf import _SafetensorsFile

    f = _SafetensorsFile(folder / "model.safetensors")
    tensors = {n: (e[0], e[1], f.read(n).tobytes()) for n, e in f.entries.items() if n != "model.layers.1.mlp.up_proj.qzeros"}
    f.close()
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(QConvertError, match="model.layers.1.mlp.up_proj lacks model.layers.1.mlp.up_proj.qzeros"):
        qconvert.quantize(folder, tmp_path / "x.q")


# --- against GPTQModel itself (optional) ------------------------------------------------


def _gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    return pytest.importorskip(
        "gptqmodel", reason="gptqmodel is not installed (pip install gptqmodel==7.6.0 --no-deps, plus its light deps)"
    )


def _quantize_with_gptqmodel(tmp_path: Path, method: str) -> Path:
    """A tiny random Llama quantized by GPTQModel on CPU: GPTQ 4-bit asymmetric act-order groups of 32,
    or AWQ GEMM groups of 32 (AWQ's clip search needs out_features % 64 == 0: 4 kv heads there)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    gptqmodel = _gptqmodel()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4 if method == "awq" else 2, vocab_size=512, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    float_dir, out = tmp_path / "float", tmp_path / f"{method}-gptqmodel"
    model.save_pretrained(float_dir)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(float_dir)
    if method == "awq":
        qc = QuantizeConfig(method="awq", format="gemm", bits=4, group_size=32, offload_to_disk=False)
        backend = BACKEND.AWQ_TORCH  # the default AWQ_GEMM backend needs CUDA
    else:
        qc = QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=False, offload_to_disk=False)
        backend = BACKEND.AUTO
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 512, (1, 64), generator=g), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
             for _ in range(16)]
    m = GPTQModel.load(str(float_dir), qc, device="cpu")
    m.quantize(calib, batch_size=1, backend=backend)
    m.save(str(out))
    assert gptqmodel.__version__
    return out


def _folder_reference(tmp_path: Path, checkpoint: Path, weights: dict[str, np.ndarray]) -> Path:
    """F32 container of a float folder: the checkpoint's float tensors plus ``weights``."""
    from safetensors import safe_open

    folder = tmp_path / "gptqmodel-dequantized"
    folder.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx"):
                tensors[k] = f.get_tensor(k).float().numpy()
    tensors.update(weights)
    write_safetensors(folder / "model.safetensors", {k: _entry(v.astype(np.float32), "F32") for k, v in tensors.items()})
    out = tmp_path / "gptqmodel-reference.q"
    qconvert.quantize(folder, out, method="f32")
    return out


def test_gptqmodel_gptq_checkpoint_imports_exactly(tmp_path):
    """GPTQModel's GPTQ (v1 format, act-order, asymmetric) -> qconvert; reference: GPTQModel's own
    dequantizer (utils.model_dequant.dequantize_model) in float32."""
    _gptqmodel()
    import torch
    from gptqmodel.utils.model_dequant import dequantize_model

    ckpt = _quantize_with_gptqmodel(tmp_path, "gptq")
    out = tmp_path / "imported.q"
    qconvert.quantize(ckpt, out)
    dequantize_model(ckpt, tmp_path / "deq", target_dtype=torch.float32)  # leaves a stale quantize_config.json
    qconvert.quantize(tmp_path / "deq", tmp_path / "ref.q", method="f32")
    qconvert.quantize(ckpt, tmp_path / "imported-f32.q", method="f32")
    with qconvert.load(out) as c:
        assert c.recipe["method"] == "import" and c.recipe["from"] == "gptq" and c.recipe["desc_act"] is True
        assert c.tensors["model.layers.0.mlp.up_proj.weight"].block_type.name == "I4G32"
        assert "input_perm" in c.tensors["model.layers.0.mlp.up_proj.weight"].extra
    with qconvert.load(tmp_path / "ref.q") as ref, qconvert.load(tmp_path / "imported-f32.q") as ours:
        assert not ref.source["quantized"]
        for name in ref.tensors:
            np.testing.assert_array_equal(ours.tensor(name), ref.tensor(name), err_msg=name)
    assert np.abs(logits(out) - logits(tmp_path / "ref.q")).max() <= 1e-3


def test_gptqmodel_awq_checkpoint_imports_exactly(tmp_path):
    """GPTQModel's AWQ GEMM -> qconvert; reference: GPTQModel's runtime dequantizer (dequantize_gemm, the
    AWQ_TORCH kernel's) in float32. (Its dequantize_model tool ignores the AWQ nibble interleave.)"""
    _gptqmodel()
    import torch
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors import safe_open

    ckpt = _quantize_with_gptqmodel(tmp_path, "awq")
    weights = {}
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(".qweight"):
                p = k[: -len(".qweight")]
                qweight, scales = f.get_tensor(k), f.get_tensor(p + ".scales").float()
                w = dequantize_gemm(qweight, f.get_tensor(p + ".qzeros"), scales, 4, qweight.shape[0] // scales.shape[0])
                weights[p + ".weight"] = w.T.numpy()
    ref = _folder_reference(tmp_path, ckpt, weights)
    out = tmp_path / "imported.q"
    qconvert.quantize(ckpt, out)
    with qconvert.load(out) as c:
        assert c.recipe["method"] == "import" and c.recipe["from"] == "awq"
        for name, w in weights.items():
            np.testing.assert_array_equal(c.tensor(name), w, err_msg=name)
    assert np.abs(logits(out) - logits(ref)).max() <= 1e-3
