"""Information-flow control as a library: train, then serve two principals under one policy.

    python examples/ifc_serving.py                    # ~30 s on 2 CPU cores
    python examples/ifc_serving.py --steps 1000 --out runs/ifc_serving

Literature is public; legal and code are private domains with one expert each. A guest may use
public experts only, a lawyer also the legal expert. Each principal's model is loaded from the run
directory with only its permitted files opened; the legal validation loss shows what access buys.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moe_lab import load_config
from moe_lab.data.policy import AccessPolicy
from moe_lab.eval.generation import generate
from moe_lab.families.ifc import load_ifc, train_ifc
from moe_lab.families.ifc.experiment import evaluate_ifc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps over all phases")
    parser.add_argument("--out", default="runs/ifc_serving")
    args = parser.parse_args()
    cfg = load_config(
        overrides=[
            "model=cpu-tiny",
            "model.moe.top_k=2",
            "data.group_fields=[domain]",
            "ifc.domain_field=domain",
            "ifc.public=literature",
            "ifc.domains=[legal,code]",
            f"train.max_steps={args.steps}",
            "train.seq_len=128",
            "train.progress=false",
            f"run.dir={args.out}",
        ]
    )
    train_ifc(cfg)
    policy = AccessPolicy.from_dict({"principals": {"guest": [], "lawyer": ["legal"]}})
    for principal in ("guest", "lawyer"):
        ifc = load_ifc(args.out, policy, principal)
        legal = evaluate_ifc(ifc, cfg)["groups"]["domain"]["legal"]["loss"]
        tok = ifc.tokenizer
        prompt = torch.tensor([[tok.bos_id, *tok.encode("The court")]])
        sampler = torch.Generator().manual_seed(0)
        out = generate(ifc.model, prompt, 60, 0.8, 0.95, tok.eos_id, sampler)
        print(f"{principal:7s} experts {'+'.join(ifc.permitted):18s} legal loss {legal:.4f}")
        print(f"        The court{tok.decode(out[0, prompt.shape[1] :].tolist())!r}")
    print(f"run directory: {Path(args.out)}")


if __name__ == "__main__":
    main()
