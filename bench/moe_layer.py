"""The reference MoE layer and MoE training step, against a dense FFN and transformers' Mixtral.

Layer: forward + backward of 8 experts, top-2, d=256, over 2048 tokens, at expert widths 344 and
688, next to (a) the dense SwiGLU of equal active FLOPs (width k * F), (b) our autograd expert
loop and our ``grouped`` backend (``torch._grouped_mm``), (c) transformers' MixtralSparseMoeBlock
with the same weights, in each of its experts implementations; and the activation memory each
keeps for its backward. Step: a Mixtral-shaped MoE model (cpu-small dims) trained one step by
moe_lab and by MixtralForCausalLM (balancing loss included on both sides). Outputs are checked
equal to transformers' before anything is timed.

    python bench/moe_layer.py                 # prints tables, writes bench/results/moe_layer.json
    # the cost that does not scale with the tokens, and how much of it the weights' size explains
    python bench/moe_layer.py --tokens 16 --layer-only --equal-params
    # where the layer's time goes outside its GEMMs: the parts alone, against the dense FFN
    python bench/moe_layer.py --layer-only --breakdown
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from timing import interleaved, ratio_table, write_json
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moe_lab import ModelConfig, build_model
from moe_lab.config import MoEConfig
from moe_lab.interop.hf import to_hf
from moe_lab.nn.experts import GroupedMoE, MoE, SwiGLU
from moe_lab.nn.experts.fused import swiglu_experts

E, K, D = 8, 2, 256
# "batched_mm" is left out: ~170x slower than the dense FFN on CPU (8 s per call here).
HF_IMPLS = ("eager", "grouped_mm")


def hf_block(ours: MoE) -> MixtralSparseMoeBlock:
    """transformers' Mixtral MoE block holding ``ours``' router and expert weights."""
    E, K, D, width = ours.cfg.num_experts, ours.cfg.top_k, ours.dim, ours.cfg.expert_hidden
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=width, num_local_experts=E, num_experts_per_tok=K
    )
    block = MixtralSparseMoeBlock(cfg).to(ours.w1.device)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.gate.weight)
        w1, v1, w2 = (p.view(E, width, D) for p in (ours.w1, ours.v1, ours.w2))
        block.experts.gate_up_proj.copy_(torch.cat([w1, v1], dim=1))  # [E, 2F, D], gate first
        block.experts.down_proj.copy_(w2.transpose(1, 2))  # [E, D, F]
    return block


def fwd_bwd(fn, x, grad):
    """One forward and backward of ``fn`` on ``x`` (the output's backward in fp32)."""

    def run():
        x.grad = None
        fn(x).float().backward(grad)

    return run


def _saved_mib(fn, x, params: set[int]) -> float:
    """MiB of activations one forward keeps for the backward (parameters and the input left out)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values()) / 2**20


def layer_variants(width: int, tokens: int, equal_params: bool) -> tuple[dict, dict]:
    """Timed forward + backward of each variant, and the activation MiB each keeps;
    ``equal_params`` adds a dense SwiGLU with as many weights as all the experts (width E * F)."""
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=width)
    ours = MoE(D, cfg, n_layers=1)
    ours.reset_parameters()
    loop = MoE(D, cfg, n_layers=1)
    loop.load_state_dict(ours.state_dict())
    loop.fused = False
    grouped = GroupedMoE(D, cfg, n_layers=1)
    grouped.load_state_dict(ours.state_dict())
    dense = SwiGLU(D, K * width, n_layers=1)
    dense.reset_parameters()
    block = hf_block(ours)
    x = torch.randn(8, tokens // 8, D, requires_grad=True)
    grad = torch.randn(8, tokens // 8, D)
    with torch.no_grad():
        expected = ours(x)[0]
        torch.testing.assert_close(grouped(x)[0], expected, atol=1e-5, rtol=1e-4)
        for impl in HF_IMPLS:
            block.experts.config._experts_implementation = impl
            torch.testing.assert_close(block(x.clone()), expected, atol=1e-5, rtol=1e-4)

    def hf(impl):
        def fn(inp):
            block.experts.config._experts_implementation = impl
            return block(inp)

        return fn

    forwards = {
        "moe_lab": lambda t: ours(t)[0],
        "moe_lab (expert loop)": lambda t: loop(t)[0],
        "moe_lab grouped (torch._grouped_mm)": lambda t: grouped(t)[0],
        f"dense SwiGLU, width {K * width}": lambda t: dense(t)[0],
        **{f"transformers {impl}": hf(impl) for impl in HF_IMPLS},
    }
    modules = [ours, loop, grouped, dense, block]
    if equal_params:
        wide = SwiGLU(D, E * width, n_layers=1)
        wide.reset_parameters()
        forwards[f"dense SwiGLU, width {E * width}"] = lambda t: wide(t)[0]
        modules.append(wide)
    params = {x.untyped_storage().data_ptr()}
    for module in modules:
        params |= {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {key: _saved_mib(fn, x, params) for key, fn in forwards.items()}
    return {key: fwd_bwd(fn, x, grad) for key, fn in forwards.items()}, saved


def breakdown_variants(width: int, tokens: int) -> dict:
    """The MoE layer and its parts, each forward + backward, next to the dense FFN of equal FLOPs:
    the experts' Function alone (on the layer's routing, computed once), the router with its
    statistics alone, and the Function's GEMM calls alone (same shapes, weights and counts, on
    preallocated operands): what the layer spends outside its GEMMs, part by part."""
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=width)
    ours = MoE(D, cfg, n_layers=1)
    ours.reset_parameters()
    dense = SwiGLU(D, K * width, n_layers=1)
    dense.reset_parameters()
    x = torch.randn(tokens, D, requires_grad=True)
    grad = torch.randn(tokens, D)
    with torch.no_grad():
        weights_TK, indices_TK, _, _ = ours.router(x)
    order = indices_TK.flatten().argsort(stable=True)
    rows_S = order // K
    scale_S = weights_TK.flatten()[order].requires_grad_()
    counts = torch.bincount(indices_TK.flatten(), minlength=E).tolist()

    def route(t):
        weights, indices, probs, logits = ours.router(t)
        stats = ours.router.stats(probs, logits, indices, torch.zeros(()))
        return weights.sum() + stats.probs_E.sum() + stats.lse_sq

    def route_fwd_bwd():
        x.grad = None
        route(x).backward()

    w1, v1, w2 = (p.detach().view(E, width, D) for p in (ours.w1, ours.v1, ours.w2))
    x_S, dy_S = (torch.randn(sum(counts), D).split(counts) for _ in range(2))
    h_S, dg_S, du_S = (torch.randn(sum(counts), width).split(counts) for _ in range(3))

    def gemms():  # the Function's calls per expert: 3 forward, 6 backward (dx as mm + addmm_)
        for e in range(E):
            x_S[e] @ w1[e].t(), x_S[e] @ v1[e].t(), h_S[e] @ w2[e]
        for e in range(E):
            dy_S[e] @ w2[e].t(), h_S[e].t() @ dy_S[e], dg_S[e].t() @ x_S[e], du_S[e].t() @ x_S[e]
            torch.mm(dg_S[e], w1[e]).addmm_(du_S[e], v1[e])

    experts = partial(swiglu_experts, w1=ours.w1, v1=ours.v1, w2=ours.w2, counts=counts)
    return {
        "MoE layer": fwd_bwd(lambda t: ours(t)[0], x, grad),
        "experts' Function alone": fwd_bwd(
            lambda t: experts(t, rows_S=rows_S, scale_S=scale_S), x, grad
        ),
        "router and statistics alone": route_fwd_bwd,
        "experts' GEMM calls alone": gemms,
        f"dense SwiGLU, width {K * width}": fwd_bwd(lambda t: dense(t)[0], x, grad),
    }


def step_variants() -> dict:
    moe = MoEConfig(
        num_experts=E, top_k=K, expert_hidden=344, lbl="mixtral", lbl_weight=0.02, z_loss_weight=0.0
    )
    cfg = ModelConfig(
        dim=D,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        ffn_hidden=344,
        vocab_size=8192,
        max_seq_len=256,
        moe=moe,
    )
    ours = build_model(cfg)
    theirs = to_hf(ours).train()
    x = torch.randint(0, 8192, (8, 256))
    targets = torch.cat([x[:, 1:], torch.full((8, 1), -100)], dim=1)
    with torch.no_grad():
        loss, aux, _ = ours.loss(x, targets)
        ref = theirs(input_ids=x, labels=x, output_router_logits=True)
        torch.testing.assert_close(loss + aux, ref.loss, atol=1e-4, rtol=1e-4)

    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    hf_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)

    def ours_step():
        loss, aux, _ = ours.loss(x, targets)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def hf_step(impl):
        def run():
            theirs.config._experts_implementation = impl
            theirs(input_ids=x, labels=x, output_router_logits=True).loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        return run

    return {"moe_lab": ours_step, **{f"transformers {i}": hf_step(i) for i in HF_IMPLS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    # few tokens (e.g. 16) leave only what does not scale with them: calls, weights, routing
    parser.add_argument("--tokens", type=int, default=2048, help="a multiple of 8")
    parser.add_argument("--layer-only", action="store_true", help="skip the training step")
    parser.add_argument(
        "--equal-params", action="store_true", help="add a dense FFN as wide as all the experts"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the layer's parts alone"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench/results/moe_layer.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    results |= {"tokens": args.tokens, "layer": {}}
    for width in (344, 688):
        variants, saved = layer_variants(width, args.tokens, args.equal_params)
        medians, peak = interleaved(variants, args.rounds, args.warmup)
        base = f"dense SwiGLU, width {K * width}"
        title = (
            f"MoE layer fwd+bwd: E={E} k={K} d={D} F={width}, {args.tokens} tokens "
            f"(mm peak {peak / 1e9:.0f} GFLOP/s)"
        )
        results["layer"][width] = ratio_table(
            title, medians, base, ("saved activations", "saved_mib", saved)
        )
    if args.breakdown:
        results["breakdown"] = {}
        for width in (344, 688):
            medians, peak = interleaved(
                breakdown_variants(width, args.tokens), args.rounds, args.warmup
            )
            title = (
                f"MoE layer by parts, fwd+bwd: F={width}, {args.tokens} tokens "
                f"(mm peak {peak / 1e9:.0f} GFLOP/s)"
            )
            base = f"dense SwiGLU, width {K * width}"
            results["breakdown"][width] = ratio_table(title, medians, base)
    if args.layer_only:
        write_json(args.out, results)
        return
    medians, peak = interleaved(step_variants(), args.rounds, args.warmup)
    title = f"MoE training step, 8 x 256 tokens (mm peak {peak / 1e9:.0f} GFLOP/s)"
    results["step"] = ratio_table(title, medians, "moe_lab")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
