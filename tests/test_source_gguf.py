"""The GGUF reader: names, shapes, config, tokenizer, q/k un-permutation, and refusal of bad files.

Small GGUF files are written with gguf-py's GGUFWriter (a test-only dependency); the reader under
test never imports it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from qconvert.errors import QConvertError
from qconvert.sources.gguf import open_gguf, permute_rows, unpermute_rows

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"

HIDDEN, N_HEAD, N_HEAD_KV, N_LAYERS, VOCAB, FFN = 64, 4, 2, 2, 32, 128
HEAD_DIM = HIDDEN // N_HEAD


def convert_hf_to_gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32)


# per-tensor GGUF type in the tiny llama: a mix of F32, F16, Q8_0 and Q4_1
LAYER_TENSORS = {
    # gguf name: (HF suffix, numpy shape, type)
    "attn_norm": ("input_layernorm", (HIDDEN,), Q.F32),
    "attn_q": ("self_attn.q_proj", (HIDDEN, HIDDEN), Q.Q4_1),
    "attn_k": ("self_attn.k_proj", (N_HEAD_KV * HEAD_DIM, HIDDEN), Q.Q8_0),
    "attn_v": ("self_attn.v_proj", (N_HEAD_KV * HEAD_DIM, HIDDEN), Q.Q4_1),
    "attn_output": ("self_attn.o_proj", (HIDDEN, HIDDEN), Q.Q8_0),
    "ffn_norm": ("post_attention_layernorm", (HIDDEN,), Q.F32),
    "ffn_gate": ("mlp.gate_proj", (FFN, HIDDEN), Q.Q4_1),
    "ffn_up": ("mlp.up_proj", (FFN, HIDDEN), Q.Q8_0),
    "ffn_down": ("mlp.down_proj", (HIDDEN, FFN), Q.F16),
}
GLOBAL_TENSORS = {
    "token_embd": ("model.embed_tokens", (VOCAB, HIDDEN), Q.Q8_0),
    "output_norm": ("model.norm", (HIDDEN,), Q.F32),
    "output": ("lm_head", (VOCAB, HIDDEN), Q.Q4_1),
}
TOKENS = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(VOCAB - 3)]


def write_tiny_llama(
    path: Path,
    arch: str = "llama",
    quantized: bool = True,
    tied: bool = False,
    with_bias: bool = False,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, tuple[np.ndarray, object]]:
    """Write a 2-layer llama GGUF; return {HF name: (HF-order float32 values, GGUF type)}."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(2.0)
    w.add_file_type(3 if quantized else 0)
    # one key of every value type, to check the KV parser (kept in provenance["general"])
    w.add_uint8("general.t_u8", 200)
    w.add_int8("general.t_i8", -100)
    w.add_uint16("general.t_u16", 60000)
    w.add_int16("general.t_i16", -30000)
    w.add_uint32("general.t_u32", 4_000_000_000)
    w.add_int32("general.t_i32", -2_000_000_000)
    w.add_float32("general.t_f32", 0.1)
    w.add_uint64("general.t_u64", 2**63 + 5)
    w.add_int64("general.t_i64", -(2**62))
    w.add_float64("general.t_f64", 0.1)
    w.add_bool("general.t_bool", True)
    w.add_array("general.t_nested", [[1, 2], [3]])
    w.add_array("general.tags", ["a", "ü"])
    # tokenizer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores([float(-i) for i in range(VOCAB)])
    w.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages }}")
    w.add_string("tokenizer.huggingface.json", '{"version": "1.0"}')

    expected: dict[str, tuple[np.ndarray, object]] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype, n_head: int | None = None) -> None:
        if not quantized:
            qtype = Q.F32
        values = rng.standard_normal(shape).astype(np.float32)
        stored = convert_hf_to_gguf_permute(values, n_head) if n_head else values
        if qtype == Q.F32:
            w.add_tensor(gguf_name, stored)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, stored.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        expected[hf_name] = (values, qtype)

    for gguf_short, (hf_short, shape, qtype) in GLOBAL_TENSORS.items():
        if gguf_short == "output" and tied:
            continue
        add(f"{gguf_short}.weight", f"{hf_short}.weight", shape, qtype)
    w.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, HEAD_DIM // 2, dtype=np.float32))
    for layer in range(N_LAYERS):
        for gguf_short, (hf_short, shape, qtype) in LAYER_TENSORS.items():
            n_head = {"attn_q": N_HEAD, "attn_k": N_HEAD_KV}.get(gguf_short)
            add(f"blk.{layer}.{gguf_short}.weight", f"model.layers.{layer}.{hf_short}.weight", shape, qtype, n_head)
            if with_bias and gguf_short in ("attn_q", "attn_k", "attn_v", "attn_output"):
                add(f"blk.{layer}.{gguf_short}.bias", f"model.layers.{layer}.{hf_short}.bias", shape[:1], Q.F32, n_head)
    for name, values in (extra_tensors or {}).items():
        w.add_tensor(name, values)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, object]]]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_llama(path)


# --------------------------------------------------------------------------------------------
# the permutation


@pytest.mark.parametrize("n_rows,n_head", [(64, 4), (32, 2), (576, 9), (192, 3), (8, 1), (4096, 32)])
def test_unpermute_inverts_convert_hf_to_gguf_permute(n_rows: int, n_head: int) -> None:
    hf = np.arange(n_rows * 3).reshape(n_rows, 3)
    stored = convert_hf_to_gguf_permute(hf, n_head)
    assert np.array_equal(stored, hf[permute_rows(n_rows, n_head)])
    assert np.array_equal(stored[unpermute_rows(n_rows, n_head)], hf)
    assert np.array_equal(permute_rows(n_rows, n_head)[unpermute_rows(n_rows, n_head)], np.arange(n_rows))
    assert not np.array_equal(stored, hf) or n_rows // n_head == 2


def test_unpermute_refuses_rows_that_do_not_split_into_heads() -> None:
    with pytest.raises(QConvertError, match="9 heads"):
        unpermute_rows(64, 9)


# --------------------------------------------------------------------------------------------
# a tiny llama written by gguf-py


def test_tiny_llama_tensors_have_hf_names_numpy_shapes_and_types(tiny) -> None:
    path, expected = tiny
    with open_gguf(path) as src:
        assert src.kind == "gguf" and src.architecture == "llama"
        got = {t.name: t for t in src.tensors}
        assert set(got) == set(expected)  # rope_freqs.weight is skipped
        for name, (values, qtype) in expected.items():
            assert got[name].shape == values.shape, name
            assert got[name].dtype == qtype.name, name
        assert [t.name for t in src.tensors][:3] == [
            "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
        ]


def test_tiny_llama_config_is_an_hf_llama_config(tiny) -> None:
    path, _ = tiny
    with open_gguf(path) as src:
        c = src.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"]) == (VOCAB, HIDDEN, FFN)
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (N_LAYERS, N_HEAD, N_HEAD_KV)
    assert c["head_dim"] == HEAD_DIM and c["max_position_embeddings"] == 256
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 500000.0  # float32 metadata, shortest decimal
    assert c["tie_word_embeddings"] is False
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert c["torch_dtype"] == "float32" and c["qconvert_rope_layout"] == "rotate_half"
    assert c["rope_scaling"]["rope_type"] == "linear" and c["rope_scaling"]["factor"] == 2.0
    assert c["qconvert_rope_freq_factors"] == pytest.approx(np.linspace(1.0, 8.0, HEAD_DIM // 2).tolist())
    json.dumps(c)


def test_tied_embeddings_when_there_is_no_output_tensor(tmp_path: Path) -> None:
    path = tmp_path / "tied.gguf"
    write_tiny_llama(path, tied=True)
    with open_gguf(path) as src:
        assert src.config["tie_word_embeddings"] is True
        assert "lm_head.weight" not in {t.name for t in src.tensors}


def test_tokenizer_metadata_and_every_kv_value_type(tiny) -> None:
    path, _ = tiny
    with open_gguf(path) as src:
        tok = src.extra_metadata["tokenizer.gguf"]
        assert tok["tokenizer.ggml.model"] == "llama" and tok["tokenizer.ggml.pre"] == "default"
        assert tok["tokenizer.ggml.tokens"] == TOKENS
        assert tok["tokenizer.ggml.scores"] == [float(-i) for i in range(VOCAB)]
        assert tok["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 1]
        assert tok["tokenizer.ggml.merges"] == ["t o", "to k"]
        assert tok["tokenizer.ggml.bos_token_id"] == 1 and tok["tokenizer.ggml.add_bos_token"] is True
        assert tok["tokenizer.chat_template"] == "{{ messages }}"
        assert src.tokenizer_json == '{"version": "1.0"}'
        json.dumps(src.extra_metadata)
        g = src.provenance["general"]
        assert (g["t_u8"], g["t_i8"], g["t_u16"], g["t_i16"]) == (200, -100, 60000, -30000)
        assert (g["t_u32"], g["t_i32"], g["t_u64"], g["t_i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 5, -(2**62))
        assert g["t_f32"] == 0.1 and g["t_f64"] == 0.1 and g["t_bool"] is True
        assert g["t_nested"] == [[1, 2], [3]] and g["tags"] == ["a", "ü"]
        assert g["name"] == "tiny test llama" and g["architecture"] == "llama"
        assert src.extra_metadata["gguf.kv"]["llama.block_count"] == N_LAYERS


def test_provenance_names_the_file_its_hash_and_types(tiny) -> None:
    path, expected = tiny
    with open_gguf(path) as src:
        p = src.provenance
    data = path.read_bytes()
    assert p["kind"] == "gguf" and p["id"] == "tiny.gguf" and p["revision"] is None
    assert p["files"] == [{"name": "tiny.gguf", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    assert p["quantized"] is True and p["gguf_version"] == 3 and p["file_type"] == 3
    counts: dict[str, int] = {}
    for _, qtype in expected.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    assert p["source_types"] == counts


def test_all_float_file_is_not_quantized(tmp_path: Path) -> None:
    path = tmp_path / "f32.gguf"
    write_tiny_llama(path, quantized=False)
    with open_gguf(path) as src:
        assert src.provenance["quantized"] is False
        assert src.provenance["source_types"] == {"F32": len(src.tensors)}


def test_q_and_k_load_in_hf_rotate_half_order(tiny) -> None:
    """Row permutation commutes with row-wise block quantization, so the un-permuted stored
    q/k equal the HF-order originals quantized directly - exactly, with no re-quantization."""
    path, expected = tiny
    with open_gguf(path) as src:
        for t in src.tensors:
            if not t.name.endswith(("q_proj.weight", "k_proj.weight")):
                continue
            values, qtype = expected[t.name]
            direct = gguf.quants.quantize(values, qtype)
            assert np.array_equal(t.load_raw(), direct.reshape(-1)), t.name
            assert np.array_equal(t.load(), dequantize(direct, qtype)), t.name


def test_q_k_biases_are_unpermuted_like_their_weights(tmp_path: Path) -> None:
    path = tmp_path / "bias.gguf"
    expected = write_tiny_llama(path, with_bias=True)
    with open_gguf(path) as src:
        assert src.config["attention_bias"] is True
        got = {t.name: t for t in src.tensors}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.1.self_attn.{proj}.bias"
            assert np.array_equal(got[name].load(), expected[name][0]), name


def test_other_tensors_equal_gguf_py_dequantize(tiny) -> None:
    path, _ = tiny
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    with open_gguf(path) as src:
        got = {t.name: t for t in src.tensors}
        pairs = [("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight"),
                 ("output_norm.weight", "model.norm.weight")]
        for gguf_short, (hf_short, _, _) in LAYER_TENSORS.items():
            if gguf_short not in ("attn_q", "attn_k"):
                pairs.append((f"blk.1.{gguf_short}.weight", f"model.layers.1.{hf_short}.weight"))
        for gguf_name, hf_name in pairs:
            r = stored[gguf_name]
            want = dequantize(np.asarray(r.data), r.tensor_type)
            assert np.array_equal(got[hf_name].load(), want.reshape(got[hf_name].shape)), hf_name
            assert got[hf_name].load_raw().tobytes() == np.asarray(r.data).tobytes(), hf_name


def test_reading_after_close_is_a_clear_error(tiny) -> None:
    path, _ = tiny
    src = open_gguf(path)
    tensor = src.tensors[0]
    src.close()
    with pytest.raises(QConvertError, match="closed"):
        tensor.load_raw()


# --------------------------------------------------------------------------------------------
# bad files


def tensor_info_pos(data: bytes, name: str) -> int:
    """Byte position just after a tensor's name in its tensor info."""
    pos = data.find(struct.pack("<Q", len(name)) + name.encode())
    assert pos > 0
    return pos + 8 + len(name)


def patched(path: Path, pos: int, new: bytes) -> Path:
    data = bytearray(path.read_bytes())
    data[pos : pos + len(new)] = new
    out = path.with_name("patched.gguf")
    out.write_bytes(bytes(data))
    return out


def cut(path: Path, size: int) -> Path:
    out = path.with_name("cut.gguf")
    out.write_bytes(path.read_bytes()[:size])
    return out


def test_bad_magic(tiny) -> None:
    path, _ = tiny
    with pytest.raises(QConvertError, match="not a GGUF file"):
        open_gguf(patched(path, 0, b"GGML"))


@pytest.mark.parametrize("version", [1, 99])
def test_unsupported_version(tiny, version: int) -> None:
    path, _ = tiny
    with pytest.raises(QConvertError, match=f"GGUF version {version} .*not supported.*2 and 3"):
        open_gguf(patched(path, 4, struct.pack("<I", version)))


def test_big_endian_file_is_named_as_such(tiny) -> None:
    path, _ = tiny
    with pytest.raises(QConvertError, match="big-endian"):
        open_gguf(patched(path, 4, struct.pack(">I", 3)))


def test_version_2_is_read(tiny) -> None:
    path, _ = tiny
    with open_gguf(patched(path, 4, struct.pack("<I", 2))) as src:
        assert src.provenance["gguf_version"] == 2


@pytest.mark.parametrize(
    "where",
    ["empty", "magic", "header", "kv key", "kv string array", "tensor info", "tensor data"],
)
def test_truncated_file(tiny, where: str) -> None:
    path, _ = tiny
    data = path.read_bytes()
    size = {
        "empty": 0,
        "magic": 3,
        "header": 12,
        "kv key": data.find(b"llama.context_length") + 4,
        "kv string array": data.find(b"tok17") + 2,
        "tensor info": tensor_info_pos(data, "blk.1.attn_q.weight") + 6,
        "tensor data": len(data) - 100,
    }[where]
    with pytest.raises(QConvertError, match="truncated GGUF file"):
        open_gguf(cut(path, size))


def test_unknown_block_type_names_the_tensor_and_id(tiny) -> None:
    path, _ = tiny
    data = path.read_bytes()
    type_pos = tensor_info_pos(data, "blk.0.attn_v.weight") + 4 + 2 * 8
    assert struct.unpack_from("<i", data, type_pos)[0] == Q.Q4_1
    with pytest.raises(QConvertError, match=r"'blk\.0\.attn_v\.weight' has block type id 250"):
        open_gguf(patched(path, type_pos, struct.pack("<i", 250)))
    # a real ggml type our registry lacks is named too
    with pytest.raises(QConvertError, match=r"block type id 27 \(I64\)"):
        open_gguf(patched(path, type_pos, struct.pack("<i", 27)))


def test_huge_tensor_count(tiny) -> None:
    path, _ = tiny
    with pytest.raises(QConvertError, match="claims 1000000000000000 tensors"):
        open_gguf(patched(path, 8, struct.pack("<Q", 10**15)))
    with pytest.raises(QConvertError, match="truncated GGUF file.*claims 100000 tensors"):
        open_gguf(patched(path, 8, struct.pack("<Q", 100_000)))


def test_huge_kv_count(tiny) -> None:
    path, _ = tiny
    with pytest.raises(QConvertError, match="claims 18446744073709551615 metadata entries, more than qconvert"):
        open_gguf(patched(path, 16, struct.pack("<Q", 2**64 - 1)))


def test_huge_string_length(tiny) -> None:
    path, _ = tiny
    with pytest.raises(QConvertError, match="metadata key 0 at byte 32 needs 4611686018427387904 bytes"):
        open_gguf(patched(path, 24, struct.pack("<Q", 2**62)))
    data = path.read_bytes()
    token_len_pos = data.find(b"tok5") - 8
    with pytest.raises(QConvertError, match=r"tokenizer\.ggml\.tokens.*\[8\].*needs 1152921504606846976 bytes"):
        open_gguf(patched(path, token_len_pos, struct.pack("<Q", 2**60)))


def test_huge_array_length(tiny) -> None:
    path, _ = tiny
    data = path.read_bytes()
    key = b"tokenizer.ggml.scores"
    count_pos = data.find(key) + len(key) + 4 + 4  # value type ARRAY, element type FLOAT32
    assert struct.unpack_from("<Q", data, count_pos)[0] == VOCAB
    with pytest.raises(QConvertError, match="truncated GGUF file.*tokenizer.ggml.scores"):
        open_gguf(patched(path, count_pos, struct.pack("<Q", 2**61)))


def test_too_many_dimensions(tiny) -> None:
    path, _ = tiny
    pos = tensor_info_pos(tiny[0].read_bytes(), "output_norm.weight")
    with pytest.raises(QConvertError, match="'output_norm.weight' has 5 dimensions"):
        open_gguf(patched(path, pos, struct.pack("<I", 5)))


def test_tensor_offset_beyond_the_file(tiny) -> None:
    path, _ = tiny
    data = path.read_bytes()
    offset_pos = tensor_info_pos(data, "blk.1.ffn_up.weight") + 4 + 2 * 8 + 4
    with pytest.raises(QConvertError, match=r"'blk\.1\.ffn_up\.weight' starts at byte .*beyond the end"):
        open_gguf(patched(path, offset_pos, struct.pack("<Q", 10**12)))
    with pytest.raises(QConvertError, match=r"truncated GGUF file.*'blk\.1\.ffn_up\.weight'.*beyond the end"):
        data_start = gguf.GGUFReader(str(path)).data_offset
        open_gguf(patched(path, offset_pos, struct.pack("<Q", len(data) - data_start - 100)))


def test_invalid_utf8_key(tiny) -> None:
    path, _ = tiny
    with pytest.raises(QConvertError, match="not valid UTF-8"):
        open_gguf(patched(path, 32, b"\xff\xfe"))


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    write_tiny_llama(path, arch="gpt2")
    with pytest.raises(QConvertError, match=r"GGUF architecture 'gpt2' is not supported yet \(supported: .*\bllama\b"):
        open_gguf(path)


def test_unmapped_tensor_name(tmp_path: Path) -> None:
    path = tmp_path / "extra.gguf"
    write_tiny_llama(path, extra_tensors={"blk.0.attn_q_norm.weight": np.ones(HIDDEN, np.float32)})
    with pytest.raises(QConvertError, match=r"'blk\.0\.attn_q_norm\.weight' has no Hugging Face llama equivalent"):
        open_gguf(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QConvertError, match="cannot read GGUF file"):
        open_gguf(tmp_path / "nope.gguf")


def test_corrupted_headers_only_raise_qconvert_errors(tiny) -> None:
    """Random byte damage in the header/metadata/tensor-info region either still parses or gives
    a QConvertError - never struct.error, IndexError, UnicodeDecodeError, MemoryError ..."""
    path, _ = tiny
    data = path.read_bytes()
    header_end = tensor_info_pos(data, "blk.1.ffn_down.weight") + 40
    rng = np.random.default_rng(1)
    damaged = path.with_name("damaged.gguf")
    for _ in range(150):
        buf = bytearray(data)
        for pos in rng.integers(4, header_end, size=int(rng.integers(1, 4))):
            buf[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            buf = buf[: int(rng.integers(0, header_end))]
        damaged.write_bytes(bytes(buf))
        try:
            with open_gguf(damaged) as src:
                for t in src.tensors:
                    t.load_raw()
        except QConvertError:
            pass


# --------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 file


@pytest.mark.shared
@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"real GGUF model not found at {SMOLLM2} (needs shared/ beside the repo)")
def test_smollm2_q4_1() -> None:
    with open_gguf(SMOLLM2) as src:
        c = src.config
        assert (c["num_hidden_layers"], c["vocab_size"], c["hidden_size"]) == (30, 49152, 576)
        assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
        assert c["intermediate_size"] == 1536 and c["max_position_embeddings"] == 8192
        assert c["tie_word_embeddings"] is True and c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == 1e-5
        assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
        tok = src.extra_metadata["tokenizer.gguf"]
        assert tok["tokenizer.ggml.model"] == "gpt2" and tok["tokenizer.ggml.pre"] == "smollm"
        assert len(tok["tokenizer.ggml.tokens"]) == 49152 and len(tok["tokenizer.ggml.merges"]) == 48900
        assert tok["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert "<|im_start|>" in tok["tokenizer.chat_template"]

        p = src.provenance
        assert p["source_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
        assert p["quantized"] is True and p["file_type"] == 3 and p["gguf_version"] == 3
        assert p["files"][0]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

        got = {t.name: t for t in src.tensors}
        assert len(got) == 272 and "lm_head.weight" not in got
        assert got["model.embed_tokens.weight"].dtype == "Q8_0"
        assert got["model.embed_tokens.weight"].shape == (49152, 576)
        for t in src.tensors:
            assert t.dtype == ("F32" if len(t.shape) == 1 else "Q4_1") or t.name == "model.embed_tokens.weight"
        assert got["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
        assert got["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)

        reader = gguf.GGUFReader(str(SMOLLM2))
        stored = {t.name: t for t in reader.tensors}
        for gguf_name, hf_name, n_head in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
                                           ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 3)):
            r = stored[gguf_name]
            as_stored = dequantize(np.asarray(r.data), r.tensor_type)
            ours = got[hf_name].load()
            assert np.array_equal(convert_hf_to_gguf_permute(ours, n_head), as_stored), hf_name
            assert np.array_equal(ours, as_stored[unpermute_rows(as_stored.shape[0], n_head)]), hf_name
        r = stored["blk.0.ffn_down.weight"]
        assert np.array_equal(got["model.layers.0.mlp.down_proj.weight"].load(),
                              dequantize(np.asarray(r.data), r.tensor_type))
