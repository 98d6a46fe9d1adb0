"""Typed configuration: dataclass schemas, YAML + ``key=value`` loading (OmegaConf), validation.

Modules receive plain dataclasses, never a ``DictConfig``. Every error a user can cause by editing a
YAML file or an override is a :class:`ConfigError` naming the dotted key and the offending value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TypeVar, get_args, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

__all__ = [
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EnsembleConfig",
    "IFCConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "RunConfig",
    "TrainConfig",
    "XELMConfig",
    "load_config",
    "load_model_preset",
    "model_presets",
    "save_config",
]

PRESET_DIR = Path(__file__).parent / "configs" / "model"

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, out of range or inconsistent."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(value: object, key: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    _require(ok, f"{key} must be a positive integer, got {value!r}")


def _positive_float(value: object, key: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    _require(ok, f"{key} must be a positive number, got {value!r}")


@dataclass
class RopeScalingConfig:
    """Llama 3.1 RoPE frequency scaling (``rope_type: llama3`` in transformers).

    Wavelengths longer than ``original_max_seq_len / low_freq_factor`` are stretched by ``factor``,
    those shorter than ``original_max_seq_len / high_freq_factor`` are kept, and the band in between
    is interpolated smoothly (Llama 3 herd paper, 2024; meta-llama/llama-models ``apply_scaling``).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def validate(self, prefix: str) -> None:
        _positive_float(self.factor, f"{prefix}.factor")
        _positive_float(self.low_freq_factor, f"{prefix}.low_freq_factor")
        _positive_float(self.high_freq_factor, f"{prefix}.high_freq_factor")
        _positive_int(self.original_max_seq_len, f"{prefix}.original_max_seq_len")
        _require(
            self.high_freq_factor > self.low_freq_factor,
            f"{prefix}.high_freq_factor ({self.high_freq_factor}) must exceed "
            f"{prefix}.low_freq_factor ({self.low_freq_factor})",
        )


LBL_FORMS = ("switch", "megablocks", "olmo", "mixtral", "none")  # moe_lab.routing.losses
MOE_BACKENDS = ("reference", "megablocks", "auto")


@dataclass
class MoEConfig:
    """Token-routed mixture of SwiGLU experts in place of the dense FFN (see moe_lab.experts.moe).

    Load-balancing loss forms (``lbl``), per MoE layer with T tokens, f = fraction of tokens whose
    top-1 is expert e, c = (token, slot) assignments to e, P = mean router probability of e:
    ``switch`` E * sum f P, summed over layers (Fedus et al. 2021; fairseq); ``olmo``
    E/(k T) * sum c P, summed over layers (OLMo-core); ``megablocks`` the same averaged over layers
    (MegaBlocks); ``mixtral`` E * sum_{k,e} f_ke P_e over all layers' tokens concatenated
    (transformers' Mixtral). Balanced routing gives 1 per layer (``mixtral``: k); every token on one
    expert gives E (``olmo``, ``megablocks``: E/k). The default, ``switch`` with weight 0.01, is the
    Switch Transformer recipe.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 88  # SwiGLU width of each expert
    every: int = 1  # layer i is an MoE layer iff (i + 1) % every == 0 (fairseq's --moe-freq)
    capacity_factor: float | None = None  # None = dropless; else capacity = factor * k * T / E
    score: str = "softmax"  # softmax | sigmoid, computed in fp32
    renormalize: bool = True  # chosen k weights sum to 1 (Mixtral, fairseq); MegaBlocks: false
    jitter: float = 0.0  # multiply router input by U(1 - jitter, 1 + jitter) while training
    lbl: str = "switch"
    lbl_weight: float = 0.01
    z_loss_weight: float = 0.001  # w * mean(logsumexp(logits)^2), summed over layers (ST-MoE)
    bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing bias (DeepSeek-V3), 1e-3 typical
    shared_expert_hidden: int = 0  # > 0: a dense SwiGLU every token also goes through
    backend: str = "reference"  # reference (PyTorch, CPU/GPU) | megablocks (CUDA) | auto

    def validate(self, prefix: str = "model.moe") -> None:
        p = prefix
        for name in ("num_experts", "top_k", "expert_hidden", "every"):
            _positive_int(getattr(self, name), f"{p}.{name}")
        _require(
            self.top_k <= self.num_experts,
            f"{p}.top_k ({self.top_k}) must not exceed {p}.num_experts ({self.num_experts})",
        )
        if self.capacity_factor is not None:
            _positive_float(self.capacity_factor, f"{p}.capacity_factor")
        _choice(self.score, ("softmax", "sigmoid"), f"{p}.score")
        _choice(self.lbl, LBL_FORMS, f"{p}.lbl")
        _choice(self.backend, MOE_BACKENDS, f"{p}.backend")
        _require(
            self.backend != "megablocks" or self.capacity_factor is None,
            f"{p}.backend=megablocks runs MegaBlocks' dropless dMoE: set {p}.capacity_factor=null, "
            f"or use {p}.backend=reference for capacity mode",
        )
        for name in ("jitter", "lbl_weight", "z_loss_weight", "bias_update_rate"):
            _require(
                getattr(self, name) >= 0, f"{p}.{name} must be >= 0, got {getattr(self, name)}"
            )
        _require(self.jitter < 1, f"{p}.jitter must be < 1, got {self.jitter}")
        _require(
            self.shared_expert_hidden >= 0,
            f"{p}.shared_expert_hidden must be >= 0, got {self.shared_expert_hidden}",
        )

    def is_moe_layer(self, layer_id: int) -> bool:
        return (layer_id + 1) % self.every == 0


@dataclass
class ModelConfig:
    """Shape of the Llama backbone. Every width is explicit: no module re-derives its own size.

    The defaults are the ``cpu-tiny`` shape with plain multi-head attention (the preset uses 2 kv
    heads); the real Llama shapes live in ``configs/model/``.
    """

    dim: int = 64  # residual stream width
    n_layers: int = 2
    n_heads: int = 4  # query heads; head_dim = dim // n_heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads
    vocab_size: int = 512
    ffn_hidden: int = 176  # SwiGLU hidden width (Llama: ~8/3 * dim rounded to a multiple)
    max_seq_len: int = 256
    rope_theta: float = (
        10000.0  # RoPE base; Llama 3 uses 500000, Llama 2 Long raises it for long context
    )
    rope_scaling: RopeScalingConfig | None = None  # Llama 3.1 frequency scaling
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with the output head
    init_std: float = 0.02  # residual projections use init_std / sqrt(2 * n_layers) (GPT-2)
    moe: MoEConfig | None = None  # None = dense; else token-routed experts (see MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def validate(self, prefix: str = "model") -> None:
        """Raise :class:`ConfigError` naming ``prefix.<field>`` for the first invalid value."""
        p = prefix
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden", "max_seq_len"):
            _positive_int(getattr(self, name), f"{p}.{name}")
        if self.n_kv_heads is not None:
            _positive_int(self.n_kv_heads, f"{p}.n_kv_heads")
            _require(
                self.n_heads % self.n_kv_heads == 0,
                f"{p}.n_heads ({self.n_heads}) must be divisible by "
                f"{p}.n_kv_heads ({self.n_kv_heads})",
            )
        _require(
            self.dim % self.n_heads == 0,
            f"{p}.dim ({self.dim}) must be divisible by {p}.n_heads ({self.n_heads})",
        )
        _require(
            self.head_dim % 2 == 0,
            f"{p}.dim / {p}.n_heads must be even for RoPE, got head_dim {self.head_dim}",
        )
        _positive_float(self.rope_theta, f"{p}.rope_theta")
        _positive_float(self.norm_eps, f"{p}.norm_eps")
        _positive_float(self.init_std, f"{p}.init_std")
        _require(
            isinstance(self.tie_embeddings, bool),
            f"{p}.tie_embeddings must be true or false, got {self.tie_embeddings!r}",
        )
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{p}.rope_scaling")
        if self.moe is not None:
            self.moe.validate(f"{p}.moe")
            _require(
                self.moe.every <= self.n_layers,
                f"{p}.moe.every ({self.moe.every}) exceeds {p}.n_layers ({self.n_layers}): "
                "no layer would be an MoE layer",
            )


def _choice(value: object, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, f"{key} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token blocks (see :mod:`moe_lab.data`)."""

    # jsonl / parquet / txt files (or hub dataset names); empty = the corpus shipped with moe_lab
    train_files: list[str] = field(default_factory=list)
    # empty: the shipped corpus' valid split, or `valid_fraction` of the training documents
    valid_files: list[str] = field(default_factory=list)
    valid_fraction: float = 0.05
    text_field: str = "text"
    # fields reported separately by evaluation; None = [domain, lang] for the shipped corpus
    group_fields: list[str] | None = None
    # keep only records whose field has one of the listed values, e.g. {lang: [en, de]}
    include: dict[str, list[str]] = field(default_factory=dict)
    # temperature sampling over the values of this field: p_g ~ n_g^alpha (XGLM: alpha = 0.3)
    sample_by: str | None = None
    sampling_alpha: float = 1.0
    tokenizer: str = "byte"  # byte | bpe | path to tokenizer.json or sentencepiece .model
    bpe_vocab_size: int | None = None  # BPE training target; None = model.vocab_size
    cache_dir: str | None = None  # tokenized arrays; None = $MOE_LAB_CACHE or ~/.cache/moe_lab

    def validate(self, prefix: str = "data") -> None:
        _require(
            isinstance(self.valid_fraction, float) and 0 <= self.valid_fraction < 1,
            f"{prefix}.valid_fraction must be in [0, 1), got {self.valid_fraction!r}",
        )
        _require(
            self.sampling_alpha >= 0,
            f"{prefix}.sampling_alpha must be >= 0, got {self.sampling_alpha!r}",
        )
        if self.bpe_vocab_size is not None:
            _positive_int(self.bpe_vocab_size, f"{prefix}.bpe_vocab_size")
        groups = self.group_fields or []
        if self.sample_by is not None and self.group_fields is not None:
            _require(
                self.sample_by in groups,
                f"{prefix}.sample_by ({self.sample_by!r}) must be one of {prefix}.group_fields "
                f"({groups})",
            )


@dataclass
class TrainConfig:
    """The training loop (see :mod:`moe_lab.train`). The budget is the first set of
    ``max_flops``, ``max_tokens``, ``max_steps``."""

    max_steps: int | None = 200
    max_tokens: int | None = None
    max_flops: float | None = None  # training FLOPs, charged by moe_lab.accounting
    batch_size: int = 8  # sequences per micro-batch (per rank under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 128
    doc_masking: bool = False  # attention stays inside each packed document (Llama 3)
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak (Llama)
    weight_decay: float = 0.1  # on matrices (embeddings included), not on norm weights
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps; 0 = only at the end
    eval_max_batches: int = 50  # cap on validation batches during training (the final eval is full)
    # sequences per evaluation batch (no activations are kept there); None = batch_size
    eval_batch_size: int | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    on_nonfinite: str = "raise"  # raise: stop before the optimizer step | skip: skip and count
    spike_window: int = 64  # loss-spike detector: losses above mean + sigma * std of the window
    spike_sigma: float = 6.0
    spike_action: str = "log"  # none | log | skip
    tensorboard: bool = False
    progress: bool = True  # tqdm bar (only on a terminal)
    # start from the weights of a run directory or checkpoint (fresh optimizer, step 0): how
    # branch-train-merge branches experts from a seed model (C-BTM's --finetune-from-model)
    init_from: str | None = None

    @property
    def eval_batch(self) -> int:
        """Sequences per evaluation batch: ``eval_batch_size``, else ``batch_size``."""
        return self.batch_size if self.eval_batch_size is None else self.eval_batch_size

    def validate(self, prefix: str = "train") -> None:
        budgets = ("max_steps", "max_tokens", "max_flops")
        _require(
            any(getattr(self, b) is not None for b in budgets),
            f"set one of {', '.join(f'{prefix}.{b}' for b in budgets)}",
        )
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), f"{prefix}.{name}")
        if self.max_flops is not None:
            _positive_float(self.max_flops, f"{prefix}.max_flops")
        if self.eval_batch_size is not None:
            _positive_int(self.eval_batch_size, f"{prefix}.eval_batch_size")
        for name in (
            "batch_size",
            "grad_accum",
            "seq_len",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "spike_window",
            "eval_max_batches",
        ):
            _positive_int(getattr(self, name), f"{prefix}.{name}")
        for name in ("lr", "eps", "spike_sigma"):
            _positive_float(getattr(self, name), f"{prefix}.{name}")
        _require(self.warmup_steps >= 0, f"{prefix}.warmup_steps must be >= 0")
        _require(self.eval_every >= 0, f"{prefix}.eval_every must be >= 0")
        _require(
            self.spike_window >= 2, f"{prefix}.spike_window must be >= 2 (a spread to judge by)"
        )
        _require(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio must be in [0, 1]")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay must be >= 0")
        _require(self.grad_clip >= 0, f"{prefix}.grad_clip must be >= 0")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"{prefix}.{name} must be in [0, 1)")
        _choice(self.precision, ("auto", "fp32", "bf16"), f"{prefix}.precision")
        _choice(self.on_nonfinite, ("raise", "skip"), f"{prefix}.on_nonfinite")
        _choice(self.spike_action, ("none", "log", "skip"), f"{prefix}.spike_action")

    def budget_share(self, share: float) -> dict[str, float | int | None]:
        """The three budget fields for ``share`` of this run's budget: its first set field
        scaled (FLOPs as a float, tokens and steps whole and at least 1), the others None. How a
        total is split between phases or experts (branch-train-merge, IFC, X-ELM)."""
        for key in ("max_flops", "max_tokens", "max_steps"):
            total = getattr(self, key)
            if total is not None:
                value = float(total * share) if key == "max_flops" else max(1, int(total * share))
                return {"max_flops": None, "max_tokens": None, "max_steps": None, key: value}
        raise ConfigError("set a training budget: train.max_flops, max_tokens or max_steps")


@dataclass
class ClusterConfig:
    """Domain discovery (``moe-lab cluster``; see moe_lab.clustering)."""

    k: int = 8
    # kmeans: tf-idf + balanced k-means (C-BTM) | random: balanced random assignment (the C-BTM
    # paper's random-cluster ablation; the clusterer is still fitted, for routing)
    method: str = "kmeans"
    n_components: int = 100  # TruncatedSVD dimensions (C-BTM: 100)
    hashing: bool = False  # hash tokens instead of learning a vocabulary (huge corpora)
    hash_bits: int = 18

    def validate(self, prefix: str = "cluster") -> None:
        _choice(self.method, ("kmeans", "random"), f"{prefix}.method")
        for name in ("k", "n_components", "hash_bits"):
            _positive_int(getattr(self, name), f"{prefix}.{name}")


@dataclass
class EnsembleConfig:
    """How ``moe-lab eval`` mixes the experts of a ``train_experts`` directory (C-BTM)."""

    clusters_dir: str | None = None  # a `moe-lab cluster` run: its clusterer routes
    # prefix (the document so far) | uniform | oracle (whole document) | average (one model with
    # the experts' parameters averaged: the BTM baseline)
    routing: str = "prefix"
    temperature: float = 0.1
    top_k: int | None = None  # experts kept per position; None = all
    distance: str = "squared"  # squared (paper) | cbtm-code (released code: distance^4)
    mix: str = "prob"  # prob (C-BTM) | logit (X-ELM downstream)

    def validate(self, prefix: str = "ensemble") -> None:
        _choice(self.routing, ("prefix", "uniform", "oracle", "average"), f"{prefix}.routing")
        _choice(self.distance, ("squared", "cbtm-code"), f"{prefix}.distance")
        _choice(self.mix, ("prob", "logit"), f"{prefix}.mix")
        _positive_float(self.temperature, f"{prefix}.temperature")
        if self.top_k is not None:
            _positive_int(self.top_k, f"{prefix}.top_k")


@dataclass
class IFCConfig:
    """Information-flow control (see moe_lab.ifc): one expert per security domain, trained only on
    that domain's documents; shared parameters are trained on the public domain only."""

    domain_field: str = "security_domain"  # the record field holding each document's domain
    public: str = "public"  # the domain everyone may read; it trains the shared parameters
    domains: list[str] = field(default_factory=list)  # private domains; empty = all in the data
    # moe: one FFN expert per domain in every MoE layer, a learned router over permitted experts;
    # ensemble: one whole expert LM per domain, branched from the public model
    form: str = "moe"
    public_share: float = 0.5  # fraction of the training budget spent on the public phase
    policy: str | None = None  # access policy file (principal -> domains) for evaluation

    def validate(self, prefix: str = "ifc") -> None:
        _choice(self.form, ("moe", "ensemble"), f"{prefix}.form")
        _require(
            0 < self.public_share < 1,
            f"{prefix}.public_share must be in (0, 1), got {self.public_share!r}",
        )
        _require(
            self.public not in self.domains,
            f"{prefix}.domains must not list the public domain {self.public!r}",
        )


@dataclass
class XELMConfig:
    """Cross-lingual expert LMs (X-ELM; see moe_lab.xelm): experts per language or language group,
    branched from a multilingual seed; languages can be added later without touching the rest."""

    lang_field: str = "lang"
    languages: list[str] = field(default_factory=list)  # first round; empty = all but `add`
    # each: one expert per language | mapping: `groups` | similarity: agglomerative clustering of
    # the languages' character n-gram profiles | kmeans: balanced k-means of those profiles
    grouping: str = "each"
    groups: dict[str, list[str]] = field(default_factory=dict)  # grouping=mapping: name -> langs
    n_groups: int = 4  # grouping=similarity | kmeans
    add: list[str] = field(default_factory=list)  # later languages, branched from nearest expert
    seed_share: float = 0.25  # budget share of the jointly trained multilingual seed
    alpha: float = 0.3  # temperature over languages for the seed and the dense baseline (XGLM)

    def validate(self, prefix: str = "xelm") -> None:
        _choice(self.grouping, ("each", "mapping", "similarity", "kmeans"), f"{prefix}.grouping")
        _positive_int(self.n_groups, f"{prefix}.n_groups")
        _require(
            0 < self.seed_share < 1,
            f"{prefix}.seed_share must be in (0, 1), got {self.seed_share!r}",
        )
        _require(self.alpha >= 0, f"{prefix}.alpha must be >= 0, got {self.alpha!r}")
        _require(
            self.grouping != "mapping" or bool(self.groups),
            f"{prefix}.grouping=mapping needs {prefix}.groups (expert name -> languages)",
        )
        overlap = sorted(set(self.add) & set(self.languages))
        _require(not overlap, f"{prefix}.add and {prefix}.languages share {overlap}")


@dataclass
class ParallelConfig:
    """Distributed training under torchrun (see moe_lab.distributed)."""

    # none | ddp: replicate the model | fsdp2: shard parameters, gradients and optimizer state;
    # either way each rank trains on its slice of one global batch
    dp: str = "none"
    # expert parallelism: each rank holds num_experts / ep_degree of every MoE layer's experts and
    # tokens travel to them by all-to-all (moe_lab.experts.parallel); with dp=ddp or fsdp2 (which
    # then shards the other parameters)
    ep: bool = False
    # ranks that split one copy of the experts (consecutive ranks: 0..d-1, d..2d-1, ...); the world
    # holds world / ep_degree copies. null = the world size (one copy)
    ep_degree: int | None = None

    def validate(self, prefix: str = "parallel") -> None:
        _choice(self.dp, ("none", "ddp", "fsdp2"), f"{prefix}.dp")
        _require(
            not self.ep or self.dp != "none",
            f"{prefix}.ep=true shards the experts over the data-parallel ranks: it needs "
            f"{prefix}.dp=ddp or fsdp2",
        )
        if self.ep_degree is not None:
            _positive_int(self.ep_degree, f"{prefix}.ep_degree")
            _require(self.ep, f"{prefix}.ep_degree is set but {prefix}.ep is false")


@dataclass
class RunConfig:
    """Where a run writes and how it starts."""

    dir: str = "runs/default"
    seed: int = 0
    resume: bool = False  # continue from the latest complete checkpoint in dir
    restore_rng: bool = True  # false only to show that resuming without RNG state diverges
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N

    def validate(self, prefix: str = "run") -> None:
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        _require(ok, f"{prefix}.device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        ok = isinstance(self.seed, int) and 0 <= self.seed < 2**32
        _require(ok, f"{prefix}.seed must be in [0, 2**32); got {self.seed!r}")


@dataclass
class Config:
    """Top-level configuration of a run; each subsystem reads its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    ifc: IFCConfig = field(default_factory=IFCConfig)
    xelm: XELMConfig = field(default_factory=XELMConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.cluster.validate("cluster")
        self.ensemble.validate("ensemble")
        self.ifc.validate("ifc")
        self.xelm.validate("xelm")
        self.parallel.validate("parallel")
        self.run.validate("run")
        _require(
            not self.parallel.ep or self.model.moe is not None,
            "parallel.ep=true needs an MoE model (model.moe)",
        )
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
            f"({self.model.max_seq_len})",
        )


def model_presets() -> list[str]:
    """Names of the model presets shipped in ``configs/model/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"model preset file {name_or_path!r} does not exist")
        return path
    path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name_or_path, model_presets(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"model: unknown preset {name_or_path!r}.{hint} Available: {', '.join(model_presets())}"
        )
    return path


def load_model_preset(
    name_or_path: str, overrides: tuple[str, ...] | list[str] = ()
) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name (``llama3-8b``) or a YAML file of model fields."""
    overrides = [f"model.{o}" for o in overrides]
    return load_config(overrides=[f"model={name_or_path}", *overrides]).model


def _split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """Separate a ``model=<preset>`` override from the ``key=value`` dotlist."""
    preset, rest = None, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key.strip() == "model":
            preset = value.strip()
        else:
            rest.append(item)
    return preset, rest


def _dataclass_of(annotation: object) -> type | None:
    """The dataclass in a field annotation such as ``RopeScalingConfig`` or ``Optional[...]``."""
    for candidate in (annotation, *get_args(annotation)):
        if is_dataclass(candidate):
            return candidate
    return None


def _suggest(schema: type, dotted: str) -> str:
    """' Did you mean ...?' for an unknown dotted key, from the schema's field names."""
    cls: type | None = schema
    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = _dataclass_of(get_type_hints(cls).get(part))
        if cls is None:
            return ""
    close = difflib.get_close_matches(leaf, [f.name for f in fields(cls)], n=1)
    return f" Did you mean {'.'.join([*parents, close[0]])!r}?" if close else ""


def _parse_dotlist(dotlist: list[str]):
    for item in dotlist:  # one at a time, so a malformed value is reported with its override
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            reason = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise ConfigError(f"override {item!r} has an invalid value ({reason})") from None
    return OmegaConf.from_dotlist(dotlist)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[C] = Config,
) -> C:
    """Load ``schema`` from an optional YAML file plus ``key=value`` overrides, and validate it.

    ``model`` may be a preset name or a path to a YAML file of model fields, either in the file
    (``model: llama3-8b``) or as an override (``model=cpu-tiny``); other ``model.*`` keys refine it.

    Args:
        path: YAML file whose keys mirror ``schema``; None starts from the defaults.
        overrides: dotlist such as ``["model.n_layers=4", "model.rope_theta=5e5"]``; applied last.
        schema: the dataclass to load (default :class:`Config`).

    Returns:
        An instance of ``schema``, validated.

    Raises:
        ConfigError: unknown keys (with a suggestion), wrong types, invalid or inconsistent values.
    """
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    preset, dotlist = _split_overrides(overrides)
    try:
        layers = [OmegaConf.structured(schema)]
        raw = OmegaConf.load(path) if path is not None else OmegaConf.create()
        if isinstance(raw.get("model"), str):
            preset_in_file = raw.pop("model")
            layers.append(OmegaConf.create({"model": OmegaConf.load(_preset_path(preset_in_file))}))
        if preset is not None:
            layers.append(OmegaConf.create({"model": OmegaConf.load(_preset_path(preset))}))
        layers += [raw, _parse_dotlist(dotlist)]
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"unknown config key {key!r}.{_suggest(schema, key)}") from None
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{key}{str(e.msg).splitlines()[0]}") from None
    cfg.validate()
    return cfg


def save_config(cfg: object, path: str | Path) -> None:
    """Write a config dataclass as YAML; :func:`load_config` reads it back to an equal object."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)
