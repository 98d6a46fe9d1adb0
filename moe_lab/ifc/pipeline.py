"""Train an information-flow-control model, and load it for one principal under an access policy.

Training (:func:`train_ifc`) runs in phases, each an ordinary resumable :func:`moe_lab.train` run
with its own optimizer, gradient clipping and loss: nothing is shared between domains but the
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
   (:class:`~moe_lab.ifc.scope.ExpertScope`); the run is checked to have left every other tensor
   bit-identical to the seed. ``form=ensemble``: the whole branched model trains.

Files: ``public/run/`` and ``domains/<d>/run/`` (run directories), ``seed/`` (``form=moe``: the
branched public model and tokenizer; the shared artefact), ``domains/<d>/expert.safetensors``
(``form=moe``: expert d's rows of every MoE tensor; ``form=ensemble``: the whole expert), and
``manifest.json``, which lists every artefact with its provenance. :func:`load_ifc` reads the
manifest, checks the provenance of everything it would use, and opens only permitted files.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from moe_lab.checkpoint import write_json, write_safetensors
from moe_lab.config import Config, ConfigError, load_config, save_config
from moe_lab.data import DataError, load_splits, narrowed, with_group_field
from moe_lab.experts.moe import MoE
from moe_lab.ifc.policy import AccessPolicy
from moe_lab.ifc.scope import ExpertScope, expert_rows, restrict_experts
from moe_lab.model import Transformer, build_model
from moe_lab.tokenizer import Tokenizer, load_tokenizer
from moe_lab.weights import load_weights

__all__ = ["IFCModel", "discover_domains", "load_ifc", "train_ifc"]

log = logging.getLogger(__name__)


def _with_domain_field(cfg: Config) -> Config:
    return with_group_field(cfg, cfg.ifc.domain_field)


def discover_domains(cfg: Config) -> list[str]:
    """The private domains of an IFC run, in expert order, checked against the training data.

    Raises:
        DataError: a document without a security domain, no public documents, or a listed
            domain without training documents.
    """
    ifc = cfg.ifc
    train_docs, _, _ = load_splits(_with_domain_field(cfg))
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


def _moe_model_cfg(cfg: Config, n_experts: int):
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
    if domain != ifc.public:
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
    from moe_lab.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"


def train_ifc(cfg: Config, out_dir: str | Path | None = None) -> dict:
    """Train the public phase, branch, and train one expert per private domain (module docstring).

    Finished phases are skipped, so an interrupted call resumes where it stopped. ``cfg.train``'s
    budget is the total over all phases: ``ifc.public_share`` of it for the public phase, the rest
    split equally over the domains.

    Args:
        cfg: the run template; ``cfg.ifc`` names the domain field, the public domain and the
            private domains.
        out_dir: where the phases and artefacts go (default ``cfg.run.dir``).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    from moe_lab.checkpoint import save_checkpoint
    from moe_lab.train import train

    cfg = _with_domain_field(cfg)
    cfg.validate()
    ifc, out = cfg.ifc, Path(out_dir or cfg.run.dir)
    domains = discover_domains(cfg)
    share = ifc.public_share  # of the total for the public phase; the rest split over domains
    public_budget = cfg.train.budget_share(share)
    domain_budget = cfg.train.budget_share((1 - share) / len(domains))
    moe_form = ifc.form == "moe"
    if moe_form:
        model_cfg = _moe_model_cfg(cfg, 1 + len(domains))
        k = model_cfg.moe.top_k
        cfg = replace(cfg, model=model_cfg)
        public_cfg = replace(model_cfg, moe=replace(model_cfg.moe, top_k=1))
        domain_cfg = replace(model_cfg, moe=replace(model_cfg.moe, top_k=min(k, 2)))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    public_run = out / "public" / "run"
    if not (out / "public" / "done").exists():
        phase = _phase(cfg, public_run, ifc.public, public_budget, init_from=None)
        if moe_form:
            train(replace(phase, model=public_cfg), scope=ExpertScope(visible=[0]))
        else:
            train(phase)
        (out / "public" / "done").touch()

    shared = out / "seed" if moe_form else out / "public"
    if moe_form and not (out / "seed" / "done").exists():
        seed = build_model(cfg.model)
        seed_weights = load_file(_final_weights(public_run))
        load_weights(seed, seed_weights)  # shapes equal: top_k differs, not the parameters
        with torch.no_grad():
            for moe in (m for m in seed.modules() if isinstance(m, MoE)):
                public_rows = expert_rows(moe, 0)
                for i in range(1, 1 + len(domains)):  # branch: every expert starts as public's
                    for name, (tensor, rows) in expert_rows(moe, i).items():
                        source, source_rows = public_rows[name]
                        tensor[rows] = source[source_rows]
        save_checkpoint(shared / "checkpoints", 0, seed, None, {}, 1)
        shutil.copytree(public_run / "tokenizer", shared / "tokenizer", dirs_exist_ok=True)
        save_config(cfg, shared / "config.yaml")
        (shared / "done").touch()
    if not moe_form:
        shutil.copy(_final_weights(public_run), out / "public" / "expert.safetensors")

    experts = {}
    for i, domain in enumerate(domains, start=1):
        expert_dir = out / "domains" / domain
        if not (expert_dir / "expert.json").exists():
            run_dir = expert_dir / "run"
            init = str(shared if moe_form else public_run)
            phase = _phase(cfg, run_dir, domain, domain_budget, init_from=init)
            if moe_form:
                phase = replace(phase, model=domain_cfg)
                result = train(phase, scope=ExpertScope(visible=[0, i], trained=i))
                weights = _domain_rows(run_dir, shared, cfg, i)
            else:
                result = train(phase)
                weights = load_file(_final_weights(run_dir))
            write_safetensors(expert_dir / "expert.safetensors", weights)
            entry = {
                "domain": domain,
                "index": i,
                "provenance": sorted({ifc.public, domain}),
                "weights": "expert.safetensors",
                "steps": result.steps,
                "tokens": result.tokens,
                "flops": result.flops,
                "valid_loss": result.valid_loss,
            }
            write_json(expert_dir / "expert.json", entry)
        experts[domain] = json.loads((expert_dir / "expert.json").read_text())

    tokenizer_kind = cfg.data.tokenizer
    manifest = {
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
            "kind": tokenizer_kind,
        },
        "experts": experts,
        "train_flops": json.loads((public_run / "eval.json").read_text())["flops"]
        + sum(e["flops"] for e in experts.values()),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _domain_rows(run_dir: Path, seed_dir: Path, cfg: Config, index: int) -> dict:
    """Expert ``index``'s rows from a domain run, after checking that nothing else changed."""
    seed, trained = build_model(cfg.model), build_model(cfg.model)
    load_weights(seed, load_file(_final_weights(seed_dir)))
    load_weights(trained, load_file(_final_weights(run_dir)))
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
            mask[_row_slice(trained, key, index)] = False
        if not torch.equal(tensor[mask], before[key][mask]):
            raise RuntimeError(f"update isolation violated: {run_dir} changed {key}")
    return rows


def _row_slice(model: Transformer, key: str, index: int) -> slice:
    module_name, _, tensor_name = key.partition(".feed_forward.")
    moe = model.get_submodule(f"{module_name}.feed_forward")
    return expert_rows(moe, index)[tensor_name][1]


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
    return load_file(path, device=str(device))


def load_ifc(
    out_dir: str | Path, policy: AccessPolicy, principal: str, device: str = "cpu"
) -> IFCModel:
    """Load what ``principal`` may use of the IFC run in ``out_dir``, and nothing else.

    Fails closed: an unknown principal, a grant without an expert, or any artefact whose
    provenance lies outside the permitted domains raises :class:`PolicyError` before any weight
    file is opened; weight files of forbidden domains are never opened.
    """
    from moe_lab.checkpoint import latest_checkpoint

    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} has no manifest.json: run train_ifc first")
    manifest = json.loads((out / "manifest.json").read_text())
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
                    params[key][_row_slice(model, key, entry["index"])] = rows
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
