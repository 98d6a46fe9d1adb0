"""The model's schema: backbone shape, RoPE scaling and the MoE layers; each counts its own
parameters (what :mod:`moe_lab.accounting` turns into FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_lab.config.base import choice, positive_float, positive_int, require

__all__ = [
    "LBL_FORMS",
    "ATTENTION_BIASES",
    "LBL_GRANULARITIES",
    "MOE_BACKENDS",
    "NORM_POSITIONS",
    "QK_NORMS",
    "ModelConfig",
    "MoEConfig",
    "RopeScalingConfig",
]


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
        positive_float(self.factor, f"{prefix}.factor")
        positive_float(self.low_freq_factor, f"{prefix}.low_freq_factor")
        positive_float(self.high_freq_factor, f"{prefix}.high_freq_factor")
        positive_int(self.original_max_seq_len, f"{prefix}.original_max_seq_len")
        require(
            self.high_freq_factor > self.low_freq_factor,
            f"{prefix}.high_freq_factor ({self.high_freq_factor}) must exceed "
            f"{prefix}.low_freq_factor ({self.low_freq_factor})",
        )


LBL_FORMS = ("switch", "megablocks", "olmo", "mixtral", "none")  # moe_lab.nn.routing.losses
LBL_GRANULARITIES = ("micro_batch", "sequence", "global_batch")
MOE_BACKENDS = ("reference", "grouped", "megablocks", "auto")
QK_NORMS = ("none", "projection", "head")  # moe_lab.nn.model.Attention
ATTENTION_BIASES = ("none", "qkv", "all")
NORM_POSITIONS = ("pre", "post")


@dataclass
class MoEConfig:
    """Token-routed mixture of SwiGLU experts in place of the dense FFN (see
    moe_lab.nn.experts.moe).

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
    dense_layers: list[int] = field(default_factory=list)  # layers kept dense whatever `every`
    capacity_factor: float | None = None  # None = dropless; else capacity = factor * k * T / E
    score: str = "softmax"  # softmax | sigmoid, computed in fp32
    renormalize: bool = True  # chosen k weights sum to 1 (Mixtral, fairseq); MegaBlocks: false
    jitter: float = 0.0  # multiply router input by U(1 - jitter, 1 + jitter) while training
    lbl: str = "switch"
    lbl_weight: float = 0.01
    # the tokens whose loads f enter the balancing loss: micro_batch (one forward pass, of every
    # data-parallel rank) | sequence (each sequence alone, averaged; DeepSeek-V3's sequence-wise
    # loss) | global_batch (also summed over the step's accumulated micro-batches so far)
    lbl_granularity: str = "micro_batch"
    z_loss_weight: float = 0.001  # w * mean(logsumexp(logits)^2), summed over layers (ST-MoE)
    bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing bias (DeepSeek-V3), 1e-3 typical
    # experts chosen for every token, the rest of the top k by score (FlexOlmo's public expert);
    # their weights are still their router probabilities
    always_selected: list[int] = field(default_factory=list)
    shared_expert_hidden: int = 0  # > 0: a dense SwiGLU every token also goes through
    # the shared expert's output scaled by sigmoid(x . g), g a learned [D] row (Qwen2-MoE)
    shared_expert_gate: bool = False
    # reference (PyTorch, CPU/GPU) | grouped (torch._grouped_mm, CPU/GPU, bf16 on CUDA)
    # | megablocks (CUDA) | auto (the fastest present: moe_lab.nn.experts.resolve_backend)
    backend: str = "reference"

    def validate(self, prefix: str = "model.moe") -> None:
        p = prefix
        for name in ("num_experts", "top_k", "expert_hidden", "every"):
            positive_int(getattr(self, name), f"{p}.{name}")
        require(
            self.top_k <= self.num_experts,
            f"{p}.top_k ({self.top_k}) must not exceed {p}.num_experts ({self.num_experts})",
        )
        if self.capacity_factor is not None:
            positive_float(self.capacity_factor, f"{p}.capacity_factor")
        choice(self.score, ("softmax", "sigmoid"), f"{p}.score")
        choice(self.lbl, LBL_FORMS, f"{p}.lbl")
        choice(self.lbl_granularity, LBL_GRANULARITIES, f"{p}.lbl_granularity")
        choice(self.backend, MOE_BACKENDS, f"{p}.backend")
        require(
            self.backend != "megablocks" or self.capacity_factor is None,
            f"{p}.backend=megablocks runs MegaBlocks' dropless dMoE: set {p}.capacity_factor=null, "
            f"or use {p}.backend=reference for capacity mode",
        )
        for name in ("jitter", "lbl_weight", "z_loss_weight", "bias_update_rate"):
            require(getattr(self, name) >= 0, f"{p}.{name} must be >= 0, got {getattr(self, name)}")
        require(self.jitter < 1, f"{p}.jitter must be < 1, got {self.jitter}")
        require(
            self.shared_expert_hidden >= 0,
            f"{p}.shared_expert_hidden must be >= 0, got {self.shared_expert_hidden}",
        )
        require(
            not self.shared_expert_gate or self.shared_expert_hidden > 0,
            f"{p}.shared_expert_gate needs a shared expert ({p}.shared_expert_hidden > 0)",
        )
        require(
            all(isinstance(e, int) and 0 <= e < self.num_experts for e in self.always_selected)
            and len(set(self.always_selected)) == len(self.always_selected) <= self.top_k,
            f"{p}.always_selected must hold at most top_k ({self.top_k}) distinct experts in "
            f"0..{self.num_experts - 1}, got {self.always_selected}",
        )
        for layer in self.dense_layers:
            require(
                isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0,
                f"{p}.dense_layers must hold layer indices >= 0, got {layer!r}",
            )

    def is_moe_layer(self, layer_id: int) -> bool:
        """Qwen-MoE's rule: every ``every``-th layer (``decoder_sparse_step``) unless listed in
        ``dense_layers`` (``mlp_only_layers``)."""
        return (layer_id + 1) % self.every == 0 and layer_id not in self.dense_layers

    def num_params(self, dim: int) -> int:
        """Parameters of one MoE layer: its E experts, router and shared expert."""
        return self.num_experts * self.expert_params(dim) + self.routed_always_params(dim)

    def num_active_params(self, dim: int) -> int:
        """Parameters of one MoE layer that a token touches: k experts, router, shared expert."""
        return self.top_k * self.expert_params(dim) + self.routed_always_params(dim)

    def expert_params(self, dim: int) -> int:
        return 3 * dim * self.expert_hidden  # w1, v1, w2: [F, D] per expert

    def routed_always_params(self, dim: int) -> int:
        """The router and the shared expert (and its gate), which every token runs."""
        shared = 3 * dim * self.shared_expert_hidden + (dim if self.shared_expert_gate else 0)
        return dim * self.num_experts + shared


@dataclass
class ModelConfig:
    """Shape of the Llama backbone. Every width is explicit: no module re-derives its own size.

    The defaults are the ``cpu-tiny`` shape with plain multi-head attention (the preset uses 2 kv
    heads); the real Llama shapes live in ``configs/model/``.
    """

    dim: int = 64  # residual stream width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads
    head_dim: int | None = None  # width of each head; None = dim // n_heads (Qwen3 sets it)
    vocab_size: int = 512  # embedding rows; at least the tokenizer's vocabulary
    ffn_hidden: int = 176  # SwiGLU hidden width (Llama: ~8/3 * dim rounded to a multiple)
    max_seq_len: int = 256  # longest context (RoPE tables, KV cache)
    # RoPE base; Llama 3 uses 500000, Llama 2 Long raises it for long context
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None  # Llama 3.1 frequency scaling
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with the output head
    init_std: float = 0.02  # residual projections use init_std / sqrt(2 * n_layers) (GPT-2)
    # RMSNorm on queries and keys before RoPE: none | projection (over all heads at once:
    # OLMo 2, OLMoE, FlexOlmo) | head (each head alone, one [head_dim] weight: Qwen3)
    qk_norm: str = "none"
    attention_bias: str = "none"  # none | qkv (Qwen2: q, k, v projections) | all (also the output)
    # pre: x + f(norm(x)) (Llama) | post: x + norm(f(x)) (OLMo 2, FlexOlmo)
    norm_position: str = "pre"
    # the transformers class this model was imported from (moe_lab.interop.hf), to_hf's default
    hf_architecture: str | None = None
    moe: MoEConfig | None = None  # None = dense; else token-routed experts (see MoEConfig)

    @property
    def head_size(self) -> int:
        """Each attention head's width: ``head_dim``, or ``dim // n_heads`` when unset."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def attention_params(self) -> int:
        """Parameters of one layer's attention: wq, wo ``[H*hd, D]``, wk, wv ``[KV*hd, D]``,
        their biases and the q/k norms' weights."""
        q, kv = self.n_heads * self.head_size, self.kv_heads * self.head_size
        biases = {"none": 0, "qkv": q + 2 * kv, "all": q + 2 * kv + self.dim}
        qk_norms = {"none": 0, "projection": q + kv, "head": 2 * self.head_size}
        extra = biases[self.attention_bias] + qk_norms[self.qk_norm]
        return self.attention_projection_params() + extra

    def attention_projection_params(self) -> int:
        """The matrices of one layer's attention: wq, wk, wv and wo."""
        return 2 * self.dim * (self.n_heads + self.kv_heads) * self.head_size

    def ffn_params(self, layer_id: int) -> tuple[int, int]:
        """(total, active per token) parameters of layer ``layer_id``'s FFN."""
        if self.moe is None or not self.moe.is_moe_layer(layer_id):
            n = 3 * self.dim * self.ffn_hidden  # SwiGLU: w1, w3 [F, D] and w2 [D, F]
            return n, n
        return self.moe.num_params(self.dim), self.moe.num_active_params(self.dim)

    def num_params(self) -> int:
        """Every parameter, a tied embedding once: ``sum(p.numel())`` of the built model."""
        ffn = sum(self.ffn_params(i)[0] for i in range(self.n_layers))
        return self.num_params_outside_ffn() + ffn

    def num_active_params(self) -> int:
        """Parameters a token touches: an MoE layer counts its router, shared expert and k of
        its E experts."""
        ffn = sum(self.ffn_params(i)[1] for i in range(self.n_layers))
        return self.num_params_outside_ffn() + ffn

    def num_params_outside_ffn(self) -> int:
        embedding = head = self.vocab_size * self.dim
        norms = (2 * self.n_layers + 1) * self.dim
        untied_head = 0 if self.tie_embeddings else head
        return embedding + self.n_layers * self.attention_params() + norms + untied_head

    def matmul_params(self) -> int:
        """Parameters in a matrix multiply per token: attention and active FFN projections and
        the output head (also when tied); the embedding is a lookup, norms are elementwise."""
        ffn = sum(self.ffn_params(i)[1] for i in range(self.n_layers))
        return self.n_layers * self.attention_projection_params() + ffn + self.vocab_size * self.dim

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        """``2 * matmul_params + 4 * L * T * H * hd`` at context ``seq_len`` (default
        ``max_seq_len``); see :mod:`moe_lab.accounting` for the conventions."""
        seq_len = self.max_seq_len if seq_len is None else seq_len
        require(seq_len > 0, f"seq_len must be positive, got {seq_len}")
        attention_scores = 4 * self.n_layers * seq_len * self.n_heads * self.head_size
        return float(2 * self.matmul_params() + attention_scores)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: three forward passes' worth (the backward costs two)."""
        return 3 * self.forward_flops_per_token(seq_len)

    def validate(self, prefix: str = "model") -> None:
        """Raise :class:`ConfigError` naming ``prefix.<field>`` for the first invalid value."""
        p = prefix
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden", "max_seq_len"):
            positive_int(getattr(self, name), f"{p}.{name}")
        if self.n_kv_heads is not None:
            positive_int(self.n_kv_heads, f"{p}.n_kv_heads")
            require(
                self.n_heads % self.n_kv_heads == 0,
                f"{p}.n_heads ({self.n_heads}) must be divisible by "
                f"{p}.n_kv_heads ({self.n_kv_heads})",
            )
        if self.head_dim is None:
            require(
                self.dim % self.n_heads == 0,
                f"{p}.dim ({self.dim}) must be divisible by {p}.n_heads ({self.n_heads}), "
                f"or set {p}.head_dim",
            )
        else:
            positive_int(self.head_dim, f"{p}.head_dim")
        require(
            self.head_size % 2 == 0,
            f"{p}.head_dim must be even for RoPE, got head_dim {self.head_size}",
        )
        choice(self.qk_norm, QK_NORMS, f"{p}.qk_norm")
        choice(self.attention_bias, ATTENTION_BIASES, f"{p}.attention_bias")
        choice(self.norm_position, NORM_POSITIONS, f"{p}.norm_position")
        positive_float(self.rope_theta, f"{p}.rope_theta")
        positive_float(self.norm_eps, f"{p}.norm_eps")
        positive_float(self.init_std, f"{p}.init_std")
        require(
            isinstance(self.tie_embeddings, bool),
            f"{p}.tie_embeddings must be true or false, got {self.tie_embeddings!r}",
        )
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{p}.rope_scaling")
        if self.moe is not None:
            self.moe.validate(f"{p}.moe")
            require(
                self.moe.every <= self.n_layers,
                f"{p}.moe.every ({self.moe.every}) exceeds {p}.n_layers ({self.n_layers}): "
                "no layer would be an MoE layer",
            )
            require(
                all(layer < self.n_layers for layer in self.moe.dense_layers),
                f"{p}.moe.dense_layers {self.moe.dense_layers} names a layer >= "
                f"{p}.n_layers ({self.n_layers})",
            )
            require(
                any(self.moe.is_moe_layer(i) for i in range(self.n_layers)),
                f"{p}.moe.dense_layers and {p}.moe.every leave no MoE layer",
            )
