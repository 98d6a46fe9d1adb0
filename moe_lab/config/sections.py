"""The schemas of a run's other sections: data, training, clustering, ensembles, information-flow
control, cross-lingual experts, parallelism and the run itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_lab.config.base import choice, positive_float, positive_int, require

__all__ = [
    "ClusterConfig",
    "DataConfig",
    "EnsembleConfig",
    "IFCConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "XELMConfig",
]


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token blocks (see
    :mod:`moe_lab.data.documents`)."""

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
        require(
            isinstance(self.valid_fraction, float) and 0 <= self.valid_fraction < 1,
            f"{prefix}.valid_fraction must be in [0, 1), got {self.valid_fraction!r}",
        )
        require(
            self.sampling_alpha >= 0,
            f"{prefix}.sampling_alpha must be >= 0, got {self.sampling_alpha!r}",
        )
        if self.bpe_vocab_size is not None:
            positive_int(self.bpe_vocab_size, f"{prefix}.bpe_vocab_size")
        groups = self.group_fields or []
        if self.sample_by is not None and self.group_fields is not None:
            require(
                self.sample_by in groups,
                f"{prefix}.sample_by ({self.sample_by!r}) must be one of {prefix}.group_fields "
                f"({groups})",
            )


@dataclass
class TrainConfig:
    """The training loop (see :mod:`moe_lab.train.loop`). The budget is the first set of
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
    # cosine (Llama) | wsd: warmup-stable-decay, the peak held, then a linear decay over the last
    # decay_fraction of the steps (Hägele et al. 2024) | constant: the peak held (a WSD trunk)
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1  # the schedule decays to this fraction of the peak (Llama)
    weight_decay: float = 0.1  # on matrices (embeddings included), not on norm weights
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    # one device's peak FLOP/s for MFU; None: the bf16 peak of a known GPU (moe_lab.hardware),
    # no MFU on CPU or an unknown GPU
    peak_flops: float | None = None
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps; 0 = only at the end
    # false: no final validation pass (eval.json still records steps, tokens, FLOPs, seconds):
    # for runs scored as part of something else, like C-BTM's seed and experts
    final_eval: bool = True
    eval_max_batches: int = 50  # cap on validation batches during training (the final eval is full)
    # sequences per evaluation batch (no activations are kept there); None = batch_size
    eval_batch_size: int | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # false: a finished run drops its checkpoints' optimizer states (most of their size); it can
    # still be evaluated, exported and branched from (init_from), but no longer resumed
    keep_optimizer: bool = True
    on_nonfinite: str = "raise"  # raise: stop before the optimizer step | skip: skip and count
    spike_window: int = 64  # loss-spike detector: losses above mean + sigma * std of the window
    spike_sigma: float = 6.0
    spike_action: str = "log"  # none | log | skip
    tensorboard: bool = False  # also log each step's numbers to RUN_DIR/tensorboard
    wandb: bool = False  # also to Weights & Biases (WANDB_MODE=offline works without a network)
    wandb_project: str = "moe_lab"
    progress: bool = True  # tqdm bar (only on a terminal)
    # start from the weights of a run directory or checkpoint (fresh optimizer, step 0): how
    # branch-train-merge branches experts from a seed model (C-BTM's --finetune-from-model)
    init_from: str | None = None
    # continue another run's checkpoint in this run.dir, with everything it saved (weights,
    # optimizer, step, data position, RNG) and this config's budget and schedule: a WSD decay
    # branched from the stable trunk (schedule=constant) equals a whole WSD run of this budget
    branch_from: str | None = None

    @property
    def eval_batch(self) -> int:
        """Sequences per evaluation batch: ``eval_batch_size``, else ``batch_size``."""
        return self.batch_size if self.eval_batch_size is None else self.eval_batch_size

    def validate(self, prefix: str = "train") -> None:
        budgets = ("max_steps", "max_tokens", "max_flops")
        require(
            any(getattr(self, b) is not None for b in budgets),
            f"set one of {', '.join(f'{prefix}.{b}' for b in budgets)}",
        )
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), f"{prefix}.{name}")
        if self.max_flops is not None:
            positive_float(self.max_flops, f"{prefix}.max_flops")
        if self.eval_batch_size is not None:
            positive_int(self.eval_batch_size, f"{prefix}.eval_batch_size")
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
            positive_int(getattr(self, name), f"{prefix}.{name}")
        for name in ("lr", "eps", "spike_sigma"):
            positive_float(getattr(self, name), f"{prefix}.{name}")
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps must be >= 0")
        require(self.eval_every >= 0, f"{prefix}.eval_every must be >= 0")
        require(
            self.spike_window >= 2, f"{prefix}.spike_window must be >= 2 (a spread to judge by)"
        )
        require(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio must be in [0, 1]")
        # AdamW steps move each weight by about lr: above 1 a run can only diverge
        require(self.lr <= 1, f"{prefix}.lr must be at most 1 (AdamW), got {self.lr}")
        require(self.eps < 1, f"{prefix}.eps must be below 1, got {self.eps}")
        require(
            0 <= self.weight_decay <= 1,
            f"{prefix}.weight_decay must be in [0, 1], got {self.weight_decay}",
        )
        require(
            0 <= self.grad_clip < float("inf"),
            f"{prefix}.grad_clip must be >= 0 and finite (0 = no clipping), got {self.grad_clip}",
        )
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"{prefix}.{name} must be in [0, 1)")
        choice(self.precision, ("auto", "fp32", "bf16"), f"{prefix}.precision")
        require(
            self.peak_flops is None or self.peak_flops > 0,
            f"{prefix}.peak_flops must be > 0 (FLOP/s of one device), got {self.peak_flops!r}",
        )
        choice(self.schedule, ("cosine", "wsd", "constant"), f"{prefix}.schedule")
        require(
            0 < self.decay_fraction <= 1,
            f"{prefix}.decay_fraction must be in (0, 1], got {self.decay_fraction!r}",
        )
        require(
            self.init_from is None or self.branch_from is None,
            f"{prefix}.init_from (weights only, step 0) and {prefix}.branch_from (the whole "
            "training state) exclude each other",
        )
        choice(self.on_nonfinite, ("raise", "skip"), f"{prefix}.on_nonfinite")
        choice(self.spike_action, ("none", "log", "skip"), f"{prefix}.spike_action")


@dataclass
class ClusterConfig:
    """Domain discovery (``moe-lab cluster``; see moe_lab.ensembles.clustering)."""

    k: int = 8
    # kmeans: tf-idf + balanced k-means (C-BTM) | random: balanced random assignment (the C-BTM
    # paper's random-cluster ablation; the clusterer routes by the random clusters' centroids)
    method: str = "kmeans"
    n_components: int = 100  # TruncatedSVD dimensions (C-BTM: 100)
    hashing: bool = False  # hash tokens instead of learning a vocabulary (huge corpora)
    hash_bits: int = 18

    def validate(self, prefix: str = "cluster") -> None:
        choice(self.method, ("kmeans", "random"), f"{prefix}.method")
        for name in ("k", "n_components", "hash_bits"):
            positive_int(getattr(self, name), f"{prefix}.{name}")


@dataclass
class EnsembleConfig:
    """How ``moe-lab eval`` mixes the experts of a ``train_experts`` directory (C-BTM)."""

    clusters_dir: str | None = None  # a `moe-lab cluster` run: its clusterer routes
    # prefix (the document so far) | document (once, on its first route_tokens tokens: exactly
    # top_k experts per document) | posterior (BTM: the experts' own likelihoods, no clusterer) |
    # uniform | oracle (whole document) | average (one model with the experts' parameters
    # averaged: the BTM baseline)
    routing: str = "prefix"
    route_tokens: int = 32  # routing=document: the tokens it routes on
    # routing=posterior: updating (Bayes over the document so far: every expert scores it) |
    # cached (one prior from the first prior_docs validation documents, then fixed)
    prior: str = "updating"
    prior_docs: int = 100
    temperature: float = 0.1
    top_k: int | None = None  # experts kept per position; None = all
    distance: str = "squared"  # squared (paper) | cbtm-code (released code: distance^4)
    mix: str = "prob"  # prob (C-BTM) | logit (X-ELM downstream)

    def validate(self, prefix: str = "ensemble") -> None:
        routings = ("prefix", "document", "posterior", "uniform", "oracle", "average")
        choice(self.routing, routings, f"{prefix}.routing")
        choice(self.prior, ("updating", "cached"), f"{prefix}.prior")
        positive_int(self.route_tokens, f"{prefix}.route_tokens")
        positive_int(self.prior_docs, f"{prefix}.prior_docs")
        require(
            self.routing != "posterior" or self.mix == "prob",
            f"{prefix}.routing=posterior mixes the experts' probabilities: set {prefix}.mix=prob",
        )
        choice(self.distance, ("squared", "cbtm-code"), f"{prefix}.distance")
        choice(self.mix, ("prob", "logit"), f"{prefix}.mix")
        positive_float(self.temperature, f"{prefix}.temperature")
        if self.top_k is not None:
            positive_int(self.top_k, f"{prefix}.top_k")


@dataclass
class IFCConfig:
    """Information-flow control (see moe_lab.families.ifc): one expert per security domain, trained
    only on that domain's documents; shared parameters are trained on the public domain only."""

    domain_field: str = "security_domain"  # the record field holding each document's domain
    public: str = "public"  # the domain everyone may read; it trains the shared parameters
    domains: list[str] = field(default_factory=list)  # private domains; empty = all in the data
    # moe: one FFN expert per domain in every MoE layer, a learned router over permitted experts;
    # ensemble: one whole expert LM per domain, branched from the public model
    form: str = "moe"
    public_share: float = 0.5  # fraction of the training budget spent on the public phase
    policy: str | None = None  # access policy file (principal -> domains) for evaluation
    # a domain phase reads its documents mixed half and half with public ones (true), or only its
    # own (false: FlexOlmo, where an owner trains on its closed data alone)
    mix_public: bool = True
    # form=moe: a domain expert's router rows start as a copy of the public expert's (random) or
    # as the mean input of each MoE layer over the domain's documents (data: FlexOlmo), computed
    # in the domain's own phase; the public row likewise from public documents
    router_init: str = "random"
    # > 0: after the merge, only the routers train on public documents for this share of the
    # budget (FlexOlmo's optional router tuning); used by principals permitted every domain
    router_tuning_share: float = 0.0

    def validate(self, prefix: str = "ifc") -> None:
        choice(self.form, ("moe", "ensemble"), f"{prefix}.form")
        choice(self.router_init, ("random", "data"), f"{prefix}.router_init")
        require(
            0 <= self.router_tuning_share < 1 - self.public_share,
            f"{prefix}.router_tuning_share must be in [0, 1 - {prefix}.public_share), "
            f"got {self.router_tuning_share!r}",
        )
        require(
            self.router_tuning_share == 0 or self.form == "moe",
            f"{prefix}.router_tuning_share tunes MoE routers: it needs {prefix}.form=moe",
        )
        require(
            self.router_init == "random" or self.form == "moe",
            f"{prefix}.router_init=data initialises MoE routers: it needs {prefix}.form=moe",
        )
        require(
            0 < self.public_share < 1,
            f"{prefix}.public_share must be in (0, 1), got {self.public_share!r}",
        )
        require(
            self.public not in self.domains,
            f"{prefix}.domains must not list the public domain {self.public!r}",
        )


@dataclass
class XELMConfig:
    """Cross-lingual expert LMs (X-ELM; see moe_lab.families.xelm): experts per language or language
    group, branched from a multilingual seed; languages can be added later without touching the
    rest."""

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
        choice(self.grouping, ("each", "mapping", "similarity", "kmeans"), f"{prefix}.grouping")
        positive_int(self.n_groups, f"{prefix}.n_groups")
        require(
            0 < self.seed_share < 1,
            f"{prefix}.seed_share must be in (0, 1), got {self.seed_share!r}",
        )
        require(self.alpha >= 0, f"{prefix}.alpha must be >= 0, got {self.alpha!r}")
        require(
            self.grouping != "mapping" or bool(self.groups),
            f"{prefix}.grouping=mapping needs {prefix}.groups (expert name -> languages)",
        )
        overlap = sorted(set(self.add) & set(self.languages))
        require(not overlap, f"{prefix}.add and {prefix}.languages share {overlap}")


@dataclass
class ParallelConfig:
    """Distributed training under torchrun (see moe_lab.train.distributed)."""

    # none | ddp: replicate the model | fsdp2: shard parameters, gradients and optimizer state;
    # either way each rank trains on its slice of one global batch
    dp: str = "none"
    # expert parallelism: each rank holds num_experts / ep_degree of every MoE layer's experts and
    # tokens travel to them by all-to-all (moe_lab.nn.experts.parallel); with dp=ddp or fsdp2 (which
    # then shards the other parameters)
    ep: bool = False
    # ranks that split one copy of the experts (consecutive ranks: 0..d-1, d..2d-1, ...); the world
    # holds world / ep_degree copies. null = the world size (one copy)
    ep_degree: int | None = None

    def validate(self, prefix: str = "parallel") -> None:
        choice(self.dp, ("none", "ddp", "fsdp2"), f"{prefix}.dp")
        require(
            not self.ep or self.dp != "none",
            f"{prefix}.ep=true shards the experts over the data-parallel ranks: it needs "
            f"{prefix}.dp=ddp or fsdp2",
        )
        if self.ep_degree is not None:
            positive_int(self.ep_degree, f"{prefix}.ep_degree")
            require(self.ep, f"{prefix}.ep_degree is set but {prefix}.ep is false")


@dataclass
class RunConfig:
    """Where a run writes and how it starts."""

    dir: str = "runs/default"
    seed: int = 0
    resume: bool = False  # continue from the latest complete checkpoint in dir
    overwrite: bool = False  # delete the run already in dir and start again
    restore_rng: bool = True  # false only to show that resuming without RNG state diverges
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    # torch's CPU threads; null = the cores other processes leave free (OMP_NUM_THREADS, if set)
    threads: int | None = None

    def validate(self, prefix: str = "run") -> None:
        require(
            not (self.resume and self.overwrite),
            f"{prefix}.resume and {prefix}.overwrite ask for opposite things: set one",
        )
        if self.threads is not None:
            positive_int(self.threads, f"{prefix}.threads")
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        require(ok, f"{prefix}.device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        ok = isinstance(self.seed, int) and 0 <= self.seed < 2**32
        require(ok, f"{prefix}.seed must be in [0, 2**32); got {self.seed!r}")
