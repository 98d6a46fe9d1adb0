"""Train an information-flow-control model, and load it for one principal under an access policy.

Training (:func:`train_ifc`) runs in phases, each an ordinary resumable :func:`moe_lab.train.loop`
run with its own optimizer, gradient clipping and loss: nothing is shared between domains but the
public seed.

1. **Public phase** on the public domain's documents: every shared parameter (embeddings,
   attention, norms, router, the public expert) is trained here and only here. The tokenizer is
   built here too, from public text.
2. **Branch**: every domain expert starts as a copy of the public expert (``form=moe``: its FFN
   rows and router row; ``form=ensemble``: the whole public model).
3. **One phase per private domain**, on that domain's documents mixed half and half with public
   ones (public data may flow anywhere, and it is what teaches a domain's router row to leave
   public text to the public expert). ``form=moe``: routers see
   the public expert and the domain's own expert, and only the latter's rows change
   (:class:`~moe_lab.families.ifc.scope.ExpertScope`); the run is checked to have left every other
   tensor bit-identical to the seed. ``form=ensemble``: the whole branched model trains.
   ``ifc.mix_public=false`` gives a domain phase its own documents only, and
   ``ifc.router_init=data`` starts each router row from its domain's data
   (:mod:`~moe_lab.families.ifc.data_rows`): FlexOlmo's recipe (``moe_lab.families.flexolmo``).

Files: ``public/run/`` and ``domains/<d>/run/`` (run directories), ``seed/`` (``form=moe``: the
branched public model and tokenizer; the shared artefact), ``domains/<d>/expert.safetensors``
(``form=moe``: expert d's rows of every MoE tensor; ``form=ensemble``: the whole expert), and
``manifest.json``, which lists every artefact with its provenance. :func:`load_ifc` reads the
manifest, checks the provenance of everything it would use, and opens only permitted files.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moe_lab import budget
from moe_lab.config import Config, ConfigError, ModelConfig, load_config, save_config
from moe_lab.data.documents import DataError, load_splits, narrowed, with_group_field
from moe_lab.data.policy import AccessPolicy
from moe_lab.data.tokenizer import Tokenizer, load_tokenizer
from moe_lab.families.ifc.data_rows import domain_init, set_public_rows
from moe_lab.families.ifc.router_tuning import tune_routers
from moe_lab.families.ifc.scope import ExpertScope, expert_rows, key_rows, restrict_experts
from moe_lab.nn.experts.moe import MoE
from moe_lab.nn.model import Transformer, build_model
from moe_lab.store.checkpoint import (
    latest_checkpoint,
    read_json,
    read_safetensors,
    save_checkpoint,
    write_json,
    write_safetensors,
)
from moe_lab.store.weights import load_weights
from moe_lab.train.loop import train

__all__ = [
    "IFCModel",
    "discover_domains",
    "load_ifc",
    "moe_model_config",
    "phase_models",
    "train_ifc",
    "with_domain_field",
]

log = logging.getLogger(__name__)


def with_domain_field(cfg: Config) -> Config:
    return with_group_field(cfg, cfg.ifc.domain_field)


def discover_domains(cfg: Config) -> list[str]:
    """The private domains of an IFC run, in expert order, checked against the training data.

    Raises:
        DataError: a document without a security domain, no public documents, or a listed
            domain without training documents.
    """
    ifc = cfg.ifc
    train_docs, _, _ = load_splits(with_domain_field(cfg))
    found = sorted(set(train_docs[ifc.domain_field]))
    if ifc.public not in found:
        raise DataError(
            f"no training document has {ifc.domain_field}={ifc.public!r} (ifc.public); "
            f"the data has {found}"
        )
    domains = list(ifc.domains) or [d for d in found if d != ifc.public]
    empty = [d for d in domains if d not in found]
    if empty:
        raise DataError(f"ifc.domains {empty} have no training documents; the data has {found}")
    if not domains:
        raise DataError(f"the training data holds only the public domain {ifc.public!r}")
    return domains


def moe_model_config(cfg: Config, n_experts: int):
    moe = cfg.model.moe
    if moe is None:
        raise ConfigError("ifc.form=moe needs MoE layers: set model.moe (or use ifc.form=ensemble)")
    if moe.capacity_factor is not None:
        raise ConfigError(
            "ifc.form=moe needs dropless experts (model.moe.capacity_factor=null): with a "
            "capacity, which tokens are dropped depends on the other sequences in the batch"
        )
    if moe.bias_update_rate > 0:
        raise ConfigError(
            "ifc.form=moe cannot use model.moe.bias_update_rate: the balancing bias is shared "
            "state that every domain's phase would update"
        )
    return replace(cfg.model, moe=replace(moe, num_experts=n_experts))


def _phase(cfg: Config, out: Path, domain: str, budget: dict, **train) -> Config:
    """The config of one phase: the public phase reads public documents; a domain phase reads
    its domain's and public documents, half and half (public text is what teaches the domain's
    router row when *not* to pick its expert; public data may flow anywhere)."""
    ifc = cfg.ifc
    data = narrowed(cfg.data, {ifc.domain_field: [domain]})
    if domain != ifc.public and ifc.mix_public:
        data = replace(
            narrowed(data, {ifc.domain_field: [ifc.public, domain]}),
            sample_by=ifc.domain_field,
            sampling_alpha=0.0,
        )
    return replace(
        cfg,
        data=data,
        train=replace(cfg.train, **budget, **train),
        run=replace(cfg.run, dir=str(out), resume=True),
    )


def _final_weights(run_dir: Path) -> Path:
    return latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"


def phase_models(cfg: Config, n_domains: int) -> tuple[Config, ModelConfig, ModelConfig]:
    """The run config and the models of the public and the domain phases. ``form=moe``: one
    expert per domain plus the public one; the public phase routes its one expert (top-1), a
    domain phase the public expert and its own (``min(k, 2)``)."""
    if cfg.ifc.form != "moe":
        return cfg, cfg.model, cfg.model
    model = moe_model_config(cfg, 1 + n_domains)
    k = model.moe.top_k
    public = replace(model, moe=replace(model.moe, top_k=1))
    return (
        replace(cfg, model=model),
        public,
        replace(model, moe=replace(model.moe, top_k=min(k, 2))),
    )


def train_ifc(
    cfg: Config, out_dir: str | Path | None = None, only: list[str] | None = None
) -> dict:
    """Train the public phase, branch, and train one expert per private domain (module docstring).

    Finished phases are skipped, so an interrupted call resumes where it stopped. ``cfg.train``'s
    budget is the total over all phases: ``ifc.public_share`` of it for the public phase, the rest
    split equally over the domains.

    Args:
        cfg: the run template; ``cfg.ifc`` names the domain field, the public domain and the
            private domains.
        out_dir: where the phases and artefacts go (default ``cfg.run.dir``).
        only: train just these domains' phases (FlexOlmo's owners, each on its own machine with
            a copy of the public phase); the manifest waits for every domain.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``), or ``{"pending": [domains]}``.
    """
    cfg = with_domain_field(cfg)
    cfg.validate()
    out = Path(out_dir or cfg.run.dir)
    domains = discover_domains(cfg)
    cfg, public_model, domain_model = phase_models(cfg, len(domains))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    _train_public(cfg, out, public_model)
    shared = _branch(cfg, out, len(domains))
    share = (1 - cfg.ifc.public_share - cfg.ifc.router_tuning_share) / len(domains)
    experts = {}
    for i, domain in enumerate(domains, start=1):
        expert_dir = out / "domains" / domain
        if not (expert_dir / "expert.json").exists():
            if only is not None and domain not in only:
                continue  # another job's
            start = shared
            if cfg.ifc.router_init == "data":  # the domain's router row, from its own data
                start = domain_init(cfg, shared, domain, i, expert_dir / "init")
            phase = _phase(cfg, expert_dir / "run", domain, budget.share(cfg.train, share),
                           init_from=str(start))  # fmt: skip
            _train_domain(replace(phase, model=domain_model), domain, i, shared)
        experts[domain] = read_json(expert_dir / "expert.json")
    if pending := [d for d in domains if d not in experts]:
        return {"pending": pending}
    manifest = _manifest(cfg, domains, experts, out / "public" / "run")
    write_json(out / "manifest.json", manifest)
    if cfg.ifc.router_tuning_share > 0:
        manifest = _tune_routers(cfg, out, manifest)
        write_json(out / "manifest.json", manifest)
    return manifest


def _tune_routers(cfg: Config, out: Path, manifest: dict) -> dict:
    """The router-tuning phase (:mod:`~moe_lab.families.ifc.router_tuning`) on public text."""
    if not (out / "router" / "router.json").exists():
        everyone = AccessPolicy({"everyone": frozenset(manifest["domains"])})
        merged = load_ifc(out, everyone, "everyone").model
        tuning = budget.share(cfg.train, cfg.ifc.router_tuning_share)
        phase = _phase(cfg, out / "router" / "run", cfg.ifc.public, tuning, init_from=None)
        tune_routers(phase, merged, out / "seed" / "tokenizer")
    entry = read_json(out / "router" / "router.json")
    entry["provenance"] = sorted({cfg.ifc.public, *manifest["domains"]})
    return manifest | {"router": entry, "train_flops": manifest["train_flops"] + entry["flops"]}


def _train_public(cfg: Config, out: Path, model: ModelConfig) -> None:
    """The public phase: the shared parameters (and, as an MoE, expert 0) on public text."""
    if (out / "public" / "done").exists():
        return
    public_budget = budget.share(cfg.train, cfg.ifc.public_share)
    phase = _phase(cfg, out / "public" / "run", cfg.ifc.public, public_budget, init_from=None)
    if cfg.ifc.form == "moe":
        train(replace(phase, model=model), scope=ExpertScope(visible=[0]))
    else:
        train(phase)
    (out / "public" / "done").touch()


def _branch(cfg: Config, out: Path, n_domains: int) -> Path:
    """What every domain phase starts from. ``form=moe``: the public model with every expert a
    copy of the public expert (``out/seed``); ``form=ensemble``: the public run itself."""
    public_run = out / "public" / "run"
    if cfg.ifc.form != "moe":
        shutil.copy(_final_weights(public_run), out / "public" / "expert.safetensors")
        return public_run
    shared = out / "seed"
    if (shared / "done").exists():
        return shared
    seed = build_model(cfg.model)
    # top_k differs, not the shapes
    load_weights(seed, read_safetensors(_final_weights(public_run)))
    if cfg.ifc.router_init == "data":  # copied to every expert's row below
        set_public_rows(seed, cfg, load_tokenizer(public_run / "tokenizer"))
    with torch.no_grad():
        for moe in (m for m in seed.modules() if isinstance(m, MoE)):
            public_rows = expert_rows(moe, 0)
            for i in range(1, 1 + n_domains):  # branch: every expert starts as public's
                for name, (tensor, rows) in expert_rows(moe, i).items():
                    source, source_rows = public_rows[name]
                    tensor[rows] = source[source_rows]
    save_checkpoint(shared / "checkpoints", 0, seed, None, {}, 1)
    shutil.copytree(public_run / "tokenizer", shared / "tokenizer", dirs_exist_ok=True)
    save_config(cfg, shared / "config.yaml")
    (shared / "done").touch()
    return shared


def _train_domain(phase: Config, domain: str, index: int, shared: Path) -> None:
    """Domain ``index``'s phase; its expert's weights and ``expert.json`` (written last)."""
    ifc, run_dir = phase.ifc, Path(phase.run.dir)
    expert_dir = run_dir.parent
    if ifc.form == "moe":
        result = train(phase, scope=ExpertScope(visible=[0, index], trained=index))
        weights = _domain_rows(run_dir, shared, phase, index)
    else:
        result = train(phase)
        weights = read_safetensors(_final_weights(run_dir))
    write_safetensors(expert_dir / "expert.safetensors", weights)
    entry = {
        "domain": domain,
        "index": index,
        "provenance": sorted({ifc.public, domain}),
        "weights": "expert.safetensors",
        "steps": result.steps,
        "tokens": result.tokens,
        "flops": result.flops,
        "valid_loss": result.valid_loss,
    }
    write_json(expert_dir / "expert.json", entry)


def _manifest(cfg: Config, domains: list[str], experts: dict, public_run: Path) -> dict:
    ifc, moe_form = cfg.ifc, cfg.ifc.form == "moe"
    return {
        "form": ifc.form,
        "domain_field": ifc.domain_field,
        "public": ifc.public,
        "domains": domains,
        "shared": {
            "config": "seed/config.yaml" if moe_form else "public/run/config.yaml",
            "weights": "seed/checkpoints" if moe_form else "public/expert.safetensors",
            "provenance": [ifc.public],
        },
        "tokenizer": {
            "dir": "seed/tokenizer" if moe_form else "public/run/tokenizer",
            # Built from public text, or byte-level, or a file the user supplied as public.
            "provenance": [ifc.public],
            "kind": cfg.data.tokenizer,
        },
        "experts": experts,
        "train_flops": read_json(public_run / "eval.json")["flops"]
        + sum(e["flops"] for e in experts.values()),
    }


def _domain_rows(run_dir: Path, seed_dir: Path, cfg: Config, index: int) -> dict:
    """Expert ``index``'s rows from a domain run, after checking that nothing else changed."""
    seed, trained = build_model(cfg.model), build_model(cfg.model)
    load_weights(seed, read_safetensors(_final_weights(seed_dir)))
    load_weights(trained, read_safetensors(_final_weights(run_dir)))
    rows, owned = {}, set()
    for name, moe in trained.named_modules():
        if isinstance(moe, MoE):
            for key, (tensor, sl) in expert_rows(moe, index).items():
                rows[f"{name}.{key}"] = tensor[sl].detach().clone()
                owned.add(f"{name}.{key}")
    before, after = seed.state_dict(), trained.state_dict()
    for key, tensor in after.items():
        mask = torch.ones(tensor.shape[0], dtype=torch.bool)
        if key in owned:
            mask[key_rows(trained, key, index)] = False
        if not torch.equal(tensor[mask], before[key][mask]):
            raise RuntimeError(f"update isolation violated: {run_dir} changed {key}")
    return rows


@dataclass
class IFCModel:
    """What one principal may run: its permitted domains and a model that uses nothing else."""

    principal: str
    permitted: list[str]  # public first, then the granted domains in expert order
    tokenizer: Tokenizer
    model: Transformer | None = None  # form=moe: routers restricted to the permitted experts
    experts: list[Transformer] | None = None  # form=ensemble: the permitted expert LMs
    cfg: Config | None = None


def _read(path: Path, device) -> dict[str, torch.Tensor]:
    """The only way :func:`load_ifc` opens a weight file (tests watch it)."""
    return read_safetensors(path, device)


def load_ifc(
    out_dir: str | Path, policy: AccessPolicy, principal: str, device: str = "cpu"
) -> IFCModel:
    """Load what ``principal`` may use of the IFC run in ``out_dir``, and nothing else.

    Fails closed: an unknown principal, a grant without an expert, or any artefact whose
    provenance lies outside the permitted domains raises :class:`PolicyError` before any weight
    file is opened; weight files of forbidden domains are never opened.
    """
    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} has no manifest.json: run train_ifc first")
    manifest = read_json(out / "manifest.json")
    permitted = policy.permitted(principal, manifest["public"], manifest["domains"])
    AccessPolicy.check("the tokenizer", manifest["tokenizer"]["provenance"], permitted)
    AccessPolicy.check("the shared parameters", manifest["shared"]["provenance"], permitted)
    granted = [manifest["experts"][d] for d in permitted[1:]]
    for entry in granted:
        AccessPolicy.check(f"expert {entry['domain']!r}", entry["provenance"], permitted)

    cfg = load_config(out / manifest["shared"]["config"])
    tokenizer = load_tokenizer(out / manifest["tokenizer"]["dir"])
    result = IFCModel(principal, permitted, tokenizer, cfg=cfg)
    if manifest["form"] == "moe":
        model = build_model(cfg.model, device="meta")
        ckpt = latest_checkpoint(out / manifest["shared"]["weights"])
        load_weights(model, _read(ckpt / "model.safetensors", device))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for entry in granted:
                path = out / "domains" / entry["domain"] / entry["weights"]
                for key, rows in _read(path, device).items():
                    params[key][key_rows(model, key, entry["index"])] = rows
        router = manifest.get("router")
        if router is not None and set(router["provenance"]) <= set(permitted):
            for key, rows in _read(out / router["weights"], device).items():
                params[key].data.copy_(rows)  # tuned with every expert: only for who may use all
        restrict_experts(model, [0] + [e["index"] for e in granted])
        result.model = model.eval()
        return result
    experts = []
    paths = [out / manifest["shared"]["weights"]]
    paths += [out / "domains" / e["domain"] / e["weights"] for e in granted]
    for path in paths:
        expert = build_model(cfg.model, device="meta")
        load_weights(expert, _read(path, device))
        experts.append(expert.eval())
    result.experts = experts
    return result
