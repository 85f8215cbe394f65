"""The published glm-4-voice-decoder ``config.yaml``, as dataclasses.

Only the ``flow`` and ``hift`` entries are read (the ``llm`` entry and the seed lines are
ignored). Missing keys take the published constructors' defaults. Options the published file
does not use and this port does not implement (macaron feed-forward, convolution modules,
solvers other than Euler, …) are refused with a ``CheckpointError`` rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reempathy.errors import CheckpointError
from reempathy.speech.decoder.yaml_config import load_tagged_yaml

CONFIG_FILE = "config.yaml"
FLOW_CLASS = "MaskedDiffWithXvec"
HIFT_CLASS = "HiFTGenerator"
MEL_RATE = 22050 / 256  # mel frames per second: the flow's length rule (22050 and 256 fixed in the published code)


@dataclass(frozen=True)
class EncoderConfig:
    """The flow's conformer encoder over unit embeddings (``BlockConformerEncoder``)."""

    input_size: int
    output_size: int = 256
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 6
    block_size: int | None = 25  # None: plain (non-block) relative-position attention
    key_bias: bool = True
    activation_type: str = "swish"


@dataclass(frozen=True)
class EstimatorConfig:
    """The U-Net that predicts the flow's velocity (``ConditionalDecoder``)."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...] = (256, 256)
    attention_head_dim: int = 64
    n_blocks: int = 1
    num_mid_blocks: int = 2
    num_heads: int = 4
    act_fn: str = "gelu"


@dataclass(frozen=True)
class FlowConfig:
    """Units → mel: embedding, encoder, length regulator, conditional flow matching (``MaskedDiffWithXvec``)."""

    encoder: EncoderConfig
    estimator: EstimatorConfig
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 4096
    input_frame_rate: float = 50.0
    regulator_channels: int = 80
    regulator_ratios: tuple[int, ...] = ()
    regulator_groups: int = 1
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10  # fixed in the published MaskedDiffWithXvec.inference


@dataclass(frozen=True)
class HiftConfig:
    """Mel → waveform: the HiFT vocoder (neural source filter + iSTFT) and its F0 predictor."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame: the upsampling rates times the iSTFT hop."""
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass(frozen=True)
class DecoderConfig:
    flow: FlowConfig
    hift: HiftConfig
    path: str = field(default="", compare=False)


def read_decoder_config(directory: Path) -> DecoderConfig:
    """``DecoderConfig`` from ``directory/config.yaml`` (tags are read as data, never evaluated)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; pass the glm-4-voice-decoder directory (config.yaml, flow.pt, hift.pt)"
        )
    raw = load_tagged_yaml(path)
    reader = _Reader(path)
    flow = reader.flow(reader.section(raw, "flow", FLOW_CLASS))
    hift = reader.hift(reader.section(raw, "hift", HIFT_CLASS))
    if flow.output_size != hift.in_channels:
        raise CheckpointError(f"{path}: flow.output_size {flow.output_size} != hift.in_channels {hift.in_channels}")
    return DecoderConfig(flow, hift, str(path))


class _Reader:
    """Typed access to the parsed YAML, every error naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def section(self, raw: dict[str, Any], key: str, cls: str, where: str = "") -> dict[str, Any]:
        node = raw.get(key)
        name = f"{where}{key}"
        if not isinstance(node, dict):
            raise self.fail(f"has no {name!r} entry; it is not a glm-4-voice-decoder config.yaml")
        declared = str(node.get("__class__", ""))
        if cls and declared.rsplit(".", 1)[-1] != cls:
            raise self.fail(
                f"{name} is {declared or 'untagged'}, not {cls}; only the GLM-4-Voice decoder layout is supported"
            )
        return node

    def num(self, node: dict[str, Any], key: str, default: Any, kind: type, name: str) -> Any:
        value = node.get(key, default)
        if value is None:
            raise self.fail(f"{name}.{key} is required")
        try:
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError
                return value
            return kind(float(value)) if kind is int and isinstance(value, str) else kind(value)
        except (TypeError, ValueError):
            raise self.fail(f"{name}.{key} = {value!r} is not a {kind.__name__}") from None

    def ints(self, node: dict[str, Any], key: str, default: Any, name: str) -> tuple[int, ...]:
        value = node.get(key, default)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
            raise self.fail(f"{name}.{key} = {value!r} is not a list of integers")
        return tuple(value)

    def nested(self, node: dict[str, Any], key: str, default: Any, name: str) -> tuple[tuple[int, ...], ...]:
        value = node.get(key, default)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (list, tuple)) for v in value):
            raise self.fail(f"{name}.{key} = {value!r} is not a list of integer lists")
        return tuple(tuple(int(x) for x in v) for v in value)

    def require(self, node: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any, name: str) -> Any:
        value = node.get(key, default)
        if value not in allowed:
            raise self.fail(f"{name}.{key} = {value!r} is not supported (supported: {', '.join(map(repr, allowed))})")
        return value

    def flow(self, node: dict[str, Any]) -> FlowConfig:
        enc = self.encoder(self.section(node, "encoder", "", "flow."))
        reg = self.section(node, "length_regulator", "InterpolateRegulator", "flow.")
        cfm = self.section(node, "decoder", "ConditionalCFM", "flow.")
        params = cfm.get("cfm_params")
        if isinstance(params, dict) and "content" in params:  # !new:omegaconf.DictConfig {content: …}
            params = params["content"]
        if not isinstance(params, dict):
            raise self.fail("flow.decoder.cfm_params is missing")
        est = self.estimator(self.section(cfm, "estimator", "ConditionalDecoder", "flow.decoder."))
        n = "flow"
        cfg = FlowConfig(
            encoder=enc,
            estimator=est,
            input_size=self.num(node, "input_size", 512, int, n),
            output_size=self.num(node, "output_size", 80, int, n),
            spk_embed_dim=self.num(node, "spk_embed_dim", 192, int, n),
            vocab_size=self.num(node, "vocab_size", 4096, int, n),
            input_frame_rate=self.num(node, "input_frame_rate", 50, float, n),
            regulator_channels=self.num(reg, "channels", None, int, "flow.length_regulator"),
            regulator_ratios=self.ints(reg, "sampling_ratios", [], "flow.length_regulator"),
            regulator_groups=self.num(reg, "groups", 1, int, "flow.length_regulator"),
            t_scheduler=str(params.get("t_scheduler", "linear")),
            inference_cfg_rate=self.num(params, "inference_cfg_rate", 0.7, float, "flow.decoder.cfm_params"),
        )
        self.require(params, "solver", ("euler",), "euler", "flow.decoder.cfm_params")
        self.require(node, "output_type", ("mel",), "mel", n)
        out_channels = reg.get("out_channels") or cfg.regulator_channels
        if out_channels != cfg.output_size or cfg.regulator_channels != cfg.output_size:
            raise self.fail("flow.length_regulator channels must equal flow.output_size")
        if enc.input_size != cfg.input_size:
            raise self.fail(f"flow.encoder.input_size {enc.input_size} != flow.input_size {cfg.input_size}")
        if est.in_channels != 4 * cfg.output_size or est.out_channels != cfg.output_size:
            raise self.fail(
                f"flow.decoder.estimator must read 4 × {cfg.output_size} channels (noise, encoder output, speaker, "
                f"prompt) and write {cfg.output_size}"
            )
        if self.num(cfm, "n_spks", 1, int, "flow.decoder") < 1:
            raise self.fail("flow.decoder.n_spks must be at least 1 (the speaker channel is part of the input)")
        return cfg

    def encoder(self, node: dict[str, Any]) -> EncoderConfig:
        n = "flow.encoder"
        cls = str(node.get("__class__", "")).rsplit(".", 1)[-1]
        if cls not in ("BlockConformerEncoder", "ConformerEncoder"):
            raise self.fail(
                f"{n} is {cls or 'untagged'}; only BlockConformerEncoder and ConformerEncoder are supported"
            )
        self.require(node, "input_layer", ("linear",), "conv2d", n)
        self.require(node, "pos_enc_layer_type", ("rel_pos_espnet",), "rel_pos", n)
        self.require(node, "normalize_before", (True,), True, n)
        self.require(node, "macaron_style", (False,), True, n)
        self.require(node, "use_cnn_module", (False,), True, n)
        self.require(node, "static_chunk_size", (0,), 0, n)
        self.require(node, "use_dynamic_chunk", (False,), False, n)
        self.require(node, "global_cmvn", (None,), None, n)
        attn = self.require(node, "selfattention_layer_type", ("block_rel_selfattn", "rel_selfattn"), "rel_selfattn", n)
        block = cls == "BlockConformerEncoder" and attn == "block_rel_selfattn"
        cfg = EncoderConfig(
            input_size=self.num(node, "input_size", None, int, n),
            output_size=self.num(node, "output_size", 256, int, n),
            attention_heads=self.num(node, "attention_heads", 4, int, n),
            linear_units=self.num(node, "linear_units", 2048, int, n),
            num_blocks=self.num(node, "num_blocks", 6, int, n),
            block_size=self.num(node, "block_size", 25, int, n) if block else None,
            key_bias=self.num(node, "key_bias", True, bool, n),
            activation_type=self.require(node, "activation_type", ("swish", "relu", "gelu", "tanh"), "swish", n),
        )
        if cfg.output_size % cfg.attention_heads:
            raise self.fail(f"{n}.output_size is not divisible by attention_heads")
        return cfg

    def estimator(self, node: dict[str, Any]) -> EstimatorConfig:
        n = "flow.decoder.estimator"
        cfg = EstimatorConfig(
            in_channels=self.num(node, "in_channels", None, int, n),
            out_channels=self.num(node, "out_channels", None, int, n),
            channels=self.ints(node, "channels", [256, 256], n),
            attention_head_dim=self.num(node, "attention_head_dim", 64, int, n),
            n_blocks=self.num(node, "n_blocks", 1, int, n),
            num_mid_blocks=self.num(node, "num_mid_blocks", 2, int, n),
            num_heads=self.num(node, "num_heads", 4, int, n),
            act_fn=self.require(node, "act_fn", ("gelu", "gelu-approximate"), "snake", n),
        )
        if not cfg.channels or any(c % 8 for c in cfg.channels):
            raise self.fail(f"{n}.channels must be multiples of 8 (GroupNorm with 8 groups)")
        return cfg

    def hift(self, node: dict[str, Any]) -> HiftConfig:
        n = "hift"
        f0 = self.section(node, "f0_predictor", "ConvRNNF0Predictor", "hift.")
        istft = node.get("istft_params", {"n_fft": 16, "hop_len": 4})
        if not isinstance(istft, dict):
            raise self.fail("hift.istft_params is not a mapping")
        cfg = HiftConfig(
            in_channels=self.num(node, "in_channels", 80, int, n),
            base_channels=self.num(node, "base_channels", 512, int, n),
            nb_harmonics=self.num(node, "nb_harmonics", 8, int, n),
            sampling_rate=self.num(node, "sampling_rate", 22050, int, n),
            nsf_alpha=self.num(node, "nsf_alpha", 0.1, float, n),
            nsf_sigma=self.num(node, "nsf_sigma", 0.003, float, n),
            nsf_voiced_threshold=self.num(node, "nsf_voiced_threshold", 10, float, n),
            upsample_rates=self.ints(node, "upsample_rates", [8, 8], n),
            upsample_kernel_sizes=self.ints(node, "upsample_kernel_sizes", [16, 16], n),
            n_fft=self.num(istft, "n_fft", 16, int, "hift.istft_params"),
            hop_len=self.num(istft, "hop_len", 4, int, "hift.istft_params"),
            resblock_kernel_sizes=self.ints(node, "resblock_kernel_sizes", [3, 7, 11], n),
            resblock_dilation_sizes=self.nested(node, "resblock_dilation_sizes", [[1, 3, 5]] * 3, n),
            source_resblock_kernel_sizes=self.ints(node, "source_resblock_kernel_sizes", [7, 11], n),
            source_resblock_dilation_sizes=self.nested(node, "source_resblock_dilation_sizes", [[1, 3, 5]] * 2, n),
            lrelu_slope=self.num(node, "lrelu_slope", 0.1, float, n),
            audio_limit=self.num(node, "audio_limit", 0.99, float, n),
            f0_num_class=self.num(f0, "num_class", 1, int, "hift.f0_predictor"),
            f0_in_channels=self.num(f0, "in_channels", 80, int, "hift.f0_predictor"),
            f0_cond_channels=self.num(f0, "cond_channels", 512, int, "hift.f0_predictor"),
        )
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise self.fail("hift.upsample_rates and upsample_kernel_sizes differ in length")
        if len(cfg.source_resblock_kernel_sizes) != len(cfg.upsample_rates):
            raise self.fail("hift needs one source resblock per upsampling stage")
        if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
            raise self.fail("hift.resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if cfg.f0_num_class != 1:
            raise self.fail("hift.f0_predictor.num_class must be 1 (one F0 value per frame)")
        return cfg
