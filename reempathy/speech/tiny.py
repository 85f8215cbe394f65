"""Tiny random-weight speech tokenizer and decoder directories in the published on-disk formats.

They load through the same code as the published glm-4-voice-tokenizer and glm-4-voice-decoder
and run in well under a second on a CPU: for tests and demos, never for listening.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_TOKENIZER_CONFIG = {
    "architectures": ["WhisperVQForConditionalGeneration"],
    "model_type": "whisper",
    "activation_function": "gelu",
    "d_model": 16,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "encoder_layers": 3,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 32,
    "decoder_layers": 1,
    "num_mel_bins": 16,
    "max_source_positions": 1500,
    "max_target_positions": 8,
    "vocab_size": 32,
    "pooling_kernel_size": 4,
    "pooling_type": "avg",
    "pooling_position": 1,
    "quantize_position": 2,
    "quantize_vocab_size": 64,
    "quantize_causal_block_size": 200,
    "quantize_causal_encoder": False,
    "quantize_encoder_only": False,
    "encoder_causal_attention": False,
    "encoder_causal_convolution": True,
    "skip_language_detection": True,
    "torch_dtype": "float32",
}

TINY_PREPROCESSOR_CONFIG = {
    "chunk_length": 30,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 16,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "WhisperProcessor",
    "return_attention_mask": False,
    "sampling_rate": 16000,
}


def tokenizer_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the published names (``model.encoder.*``, plus decoder tensors that loading skips)."""
    g = torch.Generator().manual_seed(seed)
    d, ffn, mels = cfg["d_model"], cfg["encoder_ffn_dim"], cfg["num_mel_bins"]

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def zero_mean(w: torch.Tensor) -> torch.Tensor:
        # Convolutions that ignore a constant input, so that the units follow the spectrum's shape.
        return w - w.mean(dim=(1, 2), keepdim=True)

    t: dict[str, torch.Tensor] = {
        "model.encoder.conv1.weight": zero_mean(rand(d, mels, 3, scale=0.5)),
        "model.encoder.conv1.bias": torch.zeros(d),
        "model.encoder.conv2.weight": zero_mean(rand(d, d, 3, scale=0.5)),
        "model.encoder.conv2.bias": torch.zeros(d),
        "model.encoder.embed_positions.weight": rand(cfg["max_source_positions"], d),
        "model.encoder.layer_norm.weight": torch.ones(d),
        "model.encoder.layer_norm.bias": torch.zeros(d),
        "model.encoder.codebook.weight": rand(cfg["quantize_vocab_size"], d, scale=0.4),
        "model.encoder.embed_positions2.weight": rand(cfg["max_source_positions"] // cfg["pooling_kernel_size"], d),
        "model.decoder.embed_tokens.weight": rand(cfg["vocab_size"], d),
    }
    for i in range(cfg["encoder_layers"]):
        p = f"model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{name}.weight"] = rand(d, d)
            if name != "k_proj":
                t[p + f"self_attn.{name}.bias"] = rand(d, scale=0.05)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + f"{norm}.weight"] = 1.0 + rand(d, scale=0.05)
            t[p + f"{norm}.bias"] = rand(d, scale=0.05)
        t[p + "fc1.weight"], t[p + "fc1.bias"] = rand(ffn, d), rand(ffn, scale=0.05)
        t[p + "fc2.weight"], t[p + "fc2.bias"] = rand(d, ffn), rand(d, scale=0.05)
    return t


def make_tiny_tokenizer_dir(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Write config.json, preprocessor_config.json and model.safetensors of a tiny random tokenizer."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_TOKENIZER_CONFIG, **overrides}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    pre = {**TINY_PREPROCESSOR_CONFIG, "feature_size": cfg["num_mel_bins"]}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    save_file(tokenizer_state(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# The published glm-4-voice-decoder config.yaml, layout and tags kept, dimensions shrunk.
TINY_DECODER_YAML = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 22050
text_encoder_input_size: 16
llm_input_size: 16
llm_output_size: 16
spk_embed_dim: 192

llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 64
    speech_token_size: 64
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: 16
        attention_heads: 2
        linear_units: 32
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: 2
        linear_units: 32
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 16
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {vocab_size}
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: 16
        attention_heads: 2
        linear_units: 32
        num_blocks: 2
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: 10
        input_size: 16
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [16, 16]
            dropout: 0
            attention_head_dim: 8
            n_blocks: 1
            num_mid_blocks: 2
            num_heads: 2
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 16
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16
"""


def _random_state(shapes: dict[str, torch.Size], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes: fan-in-scaled weights, norms near 1, small biases."""
    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "alpha":  # Snake frequencies must stay positive
            out[name] = 1.0 + torch.rand(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = max(1, shape.numel() // shape[0])
            out[name] = torch.randn(shape, generator=g) / fan_in**0.5
        elif leaf == "weight":  # LayerNorm / GroupNorm scales
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.05 * torch.randn(shape, generator=g)
    return out


def make_tiny_decoder_dir(directory: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write config.yaml, flow.pt and hift.pt (weight-normalised layers as weight_g/weight_v) of a tiny decoder."""
    from reempathy.speech.decoder.config import read_decoder_config
    from reempathy.speech.decoder.flow import Flow
    from reempathy.speech.decoder.hift import HiFT, is_weight_normed

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(TINY_DECODER_YAML.format(vocab_size=vocab_size))
    cfg = read_decoder_config(out)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        flow, hift = Flow(cfg.flow), HiFT(cfg.hift)
    flow_state = _random_state({k: v.shape for k, v in flow.state_dict().items()}, g)
    flow_state["input_embedding.weight"] = torch.randn(cfg.flow.vocab_size, cfg.flow.input_size, generator=g)
    hift_state = _random_state({k: v.shape for k, v in hift.state_dict().items()}, g)
    hift_state["f0_predictor.classifier.bias"] = torch.tensor([180.0])  # a voiced pitch, so the harmonics matter
    for name in [k for k in hift_state if is_weight_normed(k)]:
        w = hift_state.pop(name)
        stem = name[: -len(".weight")]
        hift_state[stem + ".weight_g"] = torch.norm_except_dim(w, 2, 0)
        hift_state[stem + ".weight_v"] = w * (1.0 + torch.rand(1, generator=g))
    torch.save(flow_state, out / "flow.pt")
    torch.save(hift_state, out / "hift.pt")
    return out
