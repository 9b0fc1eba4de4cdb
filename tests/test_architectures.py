"""Every architecture in qconvert/arch/, end to end, on tiny randomly-initialised transformers
models (fixed seed, safetensors + a byte-level BPE tokenizer):

- our F32 container's logits equal transformers' (max |diff| <= 1e-4) on a prompt longer than
  the sliding window where there is one (and for MoE with several experts chosen), also when
  the prompt is fed in two pieces through the KV cache;
- 20 greedy tokens equal transformers' ``generate``;
- Q8_0 stays within KLD 0.01 of F32; GPTQ W4 and AWQ W4 run end to end and stay close;
- GGUF export has llama.cpp's architecture key and tensor names, and re-importing it gives the
  same tensors (up to the float32 rounding of tensors llama.cpp stores shifted: Gemma's 1 + w)
  and the same logits.

Adding an architecture: one entry in ``ARCHS`` below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qconvert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qconvert.arch import by_name  # noqa: E402
from qconvert.evaluate import evaluate  # noqa: E402
from qconvert.runtime.generate import generate  # noqa: E402
from qconvert.runtime.models import load_model  # noqa: E402

VOCAB = 320
PROMPT_LEN = 24
WINDOW = 8  # sliding windows of the tiny models: shorter than the prompt

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class, model class, config kwargs, container architecture, GGUF architecture)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), "llama", "llama"),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False), "llama", "llama"),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(tie_word_embeddings=True, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
               "llama", "llama"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=16), "llama", "llama"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), "qwen2", "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True), "qwen3", "qwen3"),
    # Gemma: (1 + w) norms, GeGLU, sqrt(hidden) embedding scale; small soft-caps so that they bite.
    # query_pre_attn_scalar = head_dim: llama.cpp derives the scale from head_dim (test_gemma_* below)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"],  # llama.cpp's default pattern
                    attn_logit_softcapping=1.0, final_logit_softcapping=2.0), "gemma2", "gemma2"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"],  # not llama.cpp's default (period 6)
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                    final_logit_softcapping=3.0), "gemma3", "gemma3"),
    # Phi-3-mini: no grouped-query attention (qkv's v rows -> o is an AWQ group), a sliding window
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4, sliding_window=WINDOW), "phi3", "phi3"),
    # Phi-4-mini-like: partial rotary embeddings, tied output
    "phi3-partial": ("Phi3Config", "Phi3ForCausalLM",
                     dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
                          tie_word_embeddings=True), "phi3", "phi3"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), "mixtral", "llama"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
                  "qwen3_moe", "qwen3moe"),
}
MOE = {"mixtral", "qwen3_moe"}


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qconvert.calibration import BUILTIN_CALIBRATION

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([BUILTIN_CALIBRATION.read_text()[:20000]], trainer)
    return tok.to_str()


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return _tokenizer_json()


def make_model(name: str, folder: Path, tokenizer_json: str, **overrides):
    cfg_cls, model_cls, extra, _, _ = ARCHS[name]
    kwargs = {**_BASE, **extra, **overrides}
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # larger than the default init, so that quantization error is visible
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in n:
                p.normal_(0, 0.05)
            elif "norm" in n and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False}))
    return model


def _prompt() -> list[int]:
    return [int(i) for i in np.random.default_rng(1).integers(3, VOCAB, PROMPT_LEN)]


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request, tmp_path_factory, tokenizer_json):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    hf = make_model(name, d / "hf", tokenizer_json)
    qconvert.quantize(d / "hf", d / "f32.q", method="f32")
    return name, d, hf


def test_f32_logits_equal_transformers(built):
    name, d, hf = built
    ids = _prompt()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    with qconvert.load(d / "f32.q") as c:
        assert c.architecture == ARCHS[name][3]
        model = load_model(c)
        whole = model.forward(np.array(ids), model.new_cache(64))
        cache = model.new_cache(64)
        first = model.forward(np.array(ids[:13]), cache)
        rest = model.forward(np.array(ids[13:]), cache)
    assert np.abs(whole - ref).max() <= 1e-4, np.abs(whole - ref).max()
    assert np.abs(np.concatenate([first, rest]) - ref).max() <= 1e-4


def test_moe_prompt_routes_to_several_experts(built):
    """The logits comparison means something for MoE only if the prompt reaches several experts."""
    name, d, hf = built
    if name not in MOE:
        pytest.skip("not a mixture of experts")
    with torch.no_grad():
        out = hf(torch.tensor([_prompt()]), output_router_logits=True)
    assert len(out.router_logits) == hf.config.num_hidden_layers
    for logits in out.router_logits:
        chosen = torch.topk(logits.reshape(-1, logits.shape[-1]), hf.config.num_experts_per_tok, dim=-1).indices
        assert len(set(chosen.flatten().tolist())) >= 3, chosen


def test_greedy_20_tokens_equal_transformers(built):
    name, d, hf = built
    ids = _prompt()[:10]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    with qconvert.load(d / "f32.q") as c:
        stats = generate(load_model(c), ids, max_tokens=20)
    assert stats.ids == out


def _kld(d: Path, other: Path, n_tokens: int = 256) -> float:
    tokens = [int(i) for i in np.random.default_rng(2).integers(3, VOCAB, n_tokens)]
    with qconvert.load(d / "f32.q") as ref_c, qconvert.load(other) as c:
        r = evaluate(load_model(c), tokens, ctx=64, reference=load_model(ref_c))
    return r.reference["kld_mean"]


def test_q8_0_kld_below_0_01(built):
    name, d, _ = built
    qconvert.quantize(d / "hf", d / "q8.q", method="rtn", bits=8)
    assert _kld(d, d / "q8.q") < 0.01


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_w4_stay_close(built, method):
    name, d, _ = built
    out = d / f"{method}.q"
    qconvert.quantize(d / "hf", out, method=method, bits=4, group=32, calib_samples=4, calib_seqlen=64)
    with qconvert.load(out) as c:
        arch = by_name(c.architecture)
        types = {i.block_type.name for n, i in c.tensors.items()
                 if "layers" in n and len(i.shape) == 2 and not arch.is_float_only(n)}  # a MoE router stays float
        assert types == {"I4G32"}, types
    kld = _kld(d, out)
    assert 0 < kld < 0.1, kld


def test_gguf_export_names_and_round_trip(built):
    gguf = pytest.importorskip("gguf")
    name, d, _ = built
    from qconvert.export.gguf import export_gguf
    from qconvert.sources import open_source

    with qconvert.load(d / "f32.q") as c:
        export_gguf(c, d / "m.gguf")
        reader = gguf.GGUFReader(d / "m.gguf")
        arch_field = reader.fields["general.architecture"]
        assert bytes(arch_field.parts[arch_field.data[0]]).decode() == ARCHS[name][4]
        names = {t.name for t in reader.tensors}
        assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names or "blk.1.ffn_down_exps.weight" in names
        with open_source(str(d / "m.gguf")) as src:
            back = {t.name: t.load() for t in src.tensors}
        assert set(back) == set(c.tensors)
        arch = by_name(c.architecture)
        for n in c.tensors:
            offset = arch.gguf_value_offset.get(arch.role(n))
            if offset:
                # llama.cpp stores these as offset + w in float32 (Gemma's 1 + w): exact up to
                # the rounding of that sum, half an ulp of it
                w = c.tensor(n)
                assert (np.abs(back[n] - w) <= np.spacing(np.float32(abs(offset)) + np.abs(w)) / 2).all(), n
            else:
                np.testing.assert_array_equal(back[n], c.tensor(n), err_msg=n)
    qconvert.quantize(d / "m.gguf", d / "from-gguf.q", method="f32")
    ids = np.array(_prompt())
    with qconvert.load(d / "f32.q") as a, qconvert.load(d / "from-gguf.q") as b:
        ma, mb = load_model(a), load_model(b)
        np.testing.assert_allclose(mb.forward(ids, mb.new_cache(64)), ma.forward(ids, ma.new_cache(64)), atol=1e-5)


def _pipeline_inputs(d: Path):
    from qconvert.arch import by_name
    from qconvert.recipe import source_loader
    from qconvert.sources import open_source

    src = open_source(str(d / "hf"))
    load, names = source_loader(src, "the test")
    arch = by_name(src.architecture)
    tokens = np.random.default_rng(3).integers(3, VOCAB, (3, 32))
    return src, arch, load, names, tokens


@pytest.mark.parametrize("step", ["awq_scale", "smooth"])
def test_scale_folds_leave_the_float_model_unchanged(built, step):
    """AWQ's and SmoothQuant's scales, folded into each input group's producer (a norm, with
    Gemma's (1 + w) where it applies, or a linear), change no float output."""
    from qconvert.calibrate import run_pipeline
    from qconvert.methods.calibrated import group_for
    from qconvert.steps import AwqScale, Smooth

    name, d, _ = built
    src, arch, load, names, tokens = _pipeline_inputs(d)
    with src:
        targets = {n for n in names if arch.layer_of(n) is not None and len(load(n).shape) == 2
                   and not arch.is_float_only(n)}
        plain = run_pipeline(arch, src.config, load, names, tokens, [])
        s = AwqScale(targets, 4, 32, group_for) if step == "awq_scale" else Smooth(targets, 0.5, True)
        folded = run_pipeline(arch, src.config, load, names, tokens, [s])
    assert np.abs(folded - plain).max() <= 1e-4 * max(1.0, np.abs(plain).max())
    if step == "smooth":
        assert s.scales and all(v.std() > 0 for v in s.scales.values())


def test_input_groups_are_applied_together(built):
    """Each input group the family declares (for scale folding) is one call of the block on
    one input, and its producer exists."""
    from qconvert.arch import Context
    from qconvert.calibrate import FloatLayer, LayerRun

    name, d, _ = built
    src, arch, load, names, tokens = _pipeline_inputs(d)
    with src:
        cfg = arch.parse_config(src.config)
        layer = FloatLayer(arch, load, set(names), 0)
        x = load(next(n for n in names if arch.role(n) == "token_embd"))[tokens]
        run = LayerRun(arch, cfg, layer, x, Context(tokens.shape[1]))
        inputs = run.capture()
        groups = arch.input_groups(cfg, 0)
        assert groups
        for g in groups:
            assert g.prev is None or layer.has(g.prev), g.prev
            present = [n for n in g.linears if n in inputs]
            assert present, g
            if g.fold:  # MoE experts: each reads its own tokens of what the router (fold[0]) reads
                whole = inputs[g.fold[0]].reshape(-1, inputs[g.fold[0]].shape[-1])
                rows = {r.tobytes() for r in whole}
                assert all(r.tobytes() in rows for n in present for r in inputs[n].reshape(-1, whole.shape[-1])), g
            else:
                assert all(inputs[n] is inputs[present[0]] for n in present), g


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("awq", {}), ("awq+gptq", {}), ("w8a8", {"smooth": 0.5}),
                                          ("q4_k_m", {"calib": "builtin"})])
def test_calibration_writes_no_temporary_model(tmp_path, tokenizer_json, monkeypatch, method, extra):
    """GPTQ, AWQ, their composition, W8A8 and the importance matrix (--calib) calibrate on the
    open source: one container is written (the output), no temporary directory is made."""
    import tempfile

    from qconvert import convert
    from qconvert.calibration import BUILTIN_CALIBRATION

    make_model("llama", tmp_path / "hf", tokenizer_json)
    written = []
    real_writer = convert.ContainerWriter

    def counting_writer(path, *a, **k):
        written.append(Path(path))
        return real_writer(path, *a, **k)

    def refuse(*a, **k):
        raise AssertionError("a temporary file or directory was made")

    monkeypatch.setattr(convert, "ContainerWriter", counting_writer)
    for fn in ("TemporaryDirectory", "mkdtemp", "mkstemp", "NamedTemporaryFile"):
        monkeypatch.setattr(tempfile, fn, refuse)
    opts = {k: (BUILTIN_CALIBRATION if v == "builtin" else v) for k, v in extra.items()}
    bits = {"q4_k_m": None, "w8a8": None}.get(method, 4)
    qconvert.quantize(tmp_path / "hf", tmp_path / "out.q", method=method, bits=bits, group=32 if bits else None,
                      calib_samples=4, calib_seqlen=64, calib_chunks=2, **opts)
    assert written == [tmp_path / "out.q"]
    with qconvert.load(tmp_path / "out.q") as c:
        if method == "awq+gptq":
            assert c.recipe["steps"] == ["awq_scale", "gptq"]
        if method == "q4_k_m":
            assert c.recipe["imatrix"]["chunks"] == 2


@pytest.mark.parametrize("change,message", [
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None}, "does not divide hidden_size"),
    ({"num_key_value_heads": 3}, "does not divide num_attention_heads"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps|NaN"),  # config.json's reader refuses NaN first
    ({"rope_theta": float("inf"), "rope_parameters": None}, "rope_theta|Infinity|infinit"),
    ({"hidden_size": 10**9}, "hidden_size"),
    ({"head_dim": 10**9}, "head_dim"),
    ({"num_attention_heads": "x"}, "num_attention_heads"),
    ({"rope_scaling": "x"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"vocab_size": -5}, "vocab_size"),
])
def test_absurd_configs_are_one_clear_error(tmp_path, tokenizer_json, change, message):
    """Config validation lives in the family file: refused at quantize, before any work, and
    again when a container carrying such a config is run."""
    from qconvert.arch import by_name
    from qconvert.errors import QConvertError

    make_model("llama", tmp_path / "hf", tokenizer_json)
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(change)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QConvertError, match=message):
        qconvert.quantize(tmp_path / "hf", tmp_path / "out.q", method="f32")
    assert not (tmp_path / "out.q").exists()
    with pytest.raises(QConvertError, match=message):
        by_name("llama").parse_config(cfg)


def test_unknown_model_type_names_the_supported_ones(tmp_path, tokenizer_json):
    from qconvert.arch import supported_model_types
    from qconvert.errors import QConvertError

    make_model("llama", tmp_path / "hf", tokenizer_json)
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "falcon_h9"}))
    with pytest.raises(QConvertError, match="unknown architecture 'falcon_h9'; supported: ") as e:
        qconvert.quantize(tmp_path / "hf", tmp_path / "out.q", method="f32")
    assert all(t in str(e.value) for t in supported_model_types()) and "\n" not in str(e.value)


def test_gemma_query_pre_attn_scalar_and_llama_cpp_scale(tmp_path, tokenizer_json):
    """query_pre_attn_scalar != head_dim: our logits follow transformers; GGUF export refuses,
    since llama.cpp's gemma2/gemma3 derive the attention scale from head_dim."""
    from qconvert.errors import QConvertError
    from qconvert.export.gguf import export_gguf

    hf = make_model("gemma2", tmp_path / "hf", tokenizer_json, query_pre_attn_scalar=40)
    qconvert.quantize(tmp_path / "hf", tmp_path / "f32.q", method="f32")
    ids = _prompt()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    with qconvert.load(tmp_path / "f32.q") as c:
        model = load_model(c)
        assert np.abs(model.forward(np.array(ids), model.new_cache(64)) - ref).max() <= 1e-4
        with pytest.raises(QConvertError, match="query_pre_attn_scalar"):
            export_gguf(c, tmp_path / "m.gguf")


def test_gemma_layer_types_from_llama_cpp_keys():
    """A GGUF as convert_hf_to_gguf writes it (no sliding-window pattern): llama.cpp's default
    periods (2 for gemma2, 6 for gemma3) give layer_types; gemma3 without a window slides nowhere."""
    from qconvert.arch import by_gguf

    def kv(arch, **extra):
        base = {"context_length": 4096, "embedding_length": 64, "block_count": 7, "feed_forward_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
                "attention.value_length": 16, "attention.layer_norm_rms_epsilon": 1e-6, **extra}
        return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in base.items()}}

    shapes = {"token_embd.weight": (VOCAB, 64)}
    s, f = "sliding_attention", "full_attention"
    g2 = by_gguf("gemma2").config_from_gguf(kv("gemma2"), shapes, "gemma2")
    assert g2["layer_types"] == [s, f, s, f, s, f, s] and g2["sliding_window"] == 4096
    assert g2["attn_logit_softcapping"] == 50.0 and g2["final_logit_softcapping"] == 30.0
    g3 = by_gguf("gemma3").config_from_gguf(kv("gemma3", **{"attention.sliding_window": 8, "rope.freq_base": 1e6,
                                                              "rope.freq_base_swa": 1e4}), shapes, "gemma3")
    assert g3["layer_types"] == [s, s, s, s, s, f, s]
    cfg = by_gguf("gemma3").parse_config(g3)
    assert (cfg.rope_theta, cfg.rope_theta_local, cfg.windows[0], cfg.query_pre_attn_scalar) == (1e6, 1e4, 8, 16.0)
    g3 = by_gguf("gemma3").config_from_gguf(kv("gemma3"), shapes, "gemma3")
    assert g3["layer_types"] == [f] * 7


def test_llama_cpp_runs_every_architecture_like_our_runtime(built):
    """llama.cpp (llama-cpp-python) loads our F16 GGUF export and its logits agree with our
    runtime on the re-imported file: same top-1 at every position inside the sliding window
    (llama.cpp's llama/phi3 architectures ignore Mistral's and Phi-3's windows)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional reference tier)")
    from bench.bench_llamacpp_archs import llama_cpp_logits
    from qconvert.export.gguf import export_gguf

    name, d, _ = built
    qconvert.quantize(d / "hf", d / "f16.q", method="f16")
    with qconvert.load(d / "f16.q") as c:
        export_gguf(c, d / "f16.gguf")
    qconvert.quantize(d / "f16.gguf", d / "f16-back.q", method="f32")
    ids = _prompt()
    with qconvert.load(d / "f16-back.q") as c:
        m = load_model(c)
        ours = m.forward(np.array(ids), m.new_cache(64))
    ref = llama_cpp_logits(d / "f16.gguf", ids)
    windowed = ARCHS[name][4] in ("llama", "phi3") and ARCHS[name][2].get("sliding_window")
    n = WINDOW if windowed else len(ids)
    assert (ours[:n].argmax(-1) == ref[:n].argmax(-1)).all()
    assert np.abs(ours[:n] - ref[:n]).max() < 0.02
