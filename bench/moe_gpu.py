"""The MoE layer and training step on CUDA: the reference backend against MegaBlocks.

Layer: forward + backward under bf16 autocast (the training path) of 8 experts, top-2, at two
sizes, side by side with the same weights: the dense SwiGLU of equal active FLOPs (width k * F),
moe_lab's ``reference`` backend (the fused Function, and its autograd loop), its ``megablocks``
backend (dMoE kernels, grouped_gemm) and transformers' MixtralSparseMoeBlock (``grouped_mm``,
bf16 weights); and the GPU memory each takes above its weights. Step: one AdamW step of a dense
model and of its equal-active-FLOP MoE on each backend. Outputs are checked against the
reference before anything is timed.

Needs CUDA; the megablocks rows need ``pip install 'moe_lab[gpu]'`` and are left out without it.

    python bench/moe_gpu.py            # prints tables, writes bench/results/moe_gpu.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from moe_layer import fwd_bwd, hf_block
from timing import interleaved, ratio_table, write_json

from moe_lab import ModelConfig, build_model
from moe_lab.config import MoEConfig
from moe_lab.nn.experts import MegaBlocksMoE, MoE, SwiGLU
from moe_lab.nn.experts.megablocks import megablocks_available

E, K = 8, 2
# (model dim, expert width, tokens): a 1B-class FFN, and Mixtral 8x7B's.
LAYERS = ((2048, 5632, 16384), (4096, 14336, 8192))
STEP = ModelConfig(
    dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_hidden=2 * 1408, vocab_size=32000,
    max_seq_len=2048,
)  # fmt: skip
STEP_MOE = MoEConfig(num_experts=E, top_k=K, expert_hidden=1408)
BF16 = torch.bfloat16


def _autocast(fn):
    def run(x):
        with torch.autocast("cuda", dtype=BF16):
            return fn(x)

    return run


def _peak_mib(run) -> float:
    """GPU memory one call takes above what was allocated before it: weights, their gradients
    (a first call allocates them) and the input are left out."""
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer_variants(dim: int, width: int, tokens: int) -> dict:
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=width)
    ours = MoE(dim, cfg, n_layers=1)
    ours.reset_parameters()
    ours.cuda()
    loop = MoE(dim, cfg, n_layers=1).cuda()
    loop.load_state_dict(ours.state_dict())
    loop.fused = False
    dense = SwiGLU(dim, K * width, n_layers=1)
    dense.reset_parameters()
    dense.cuda()
    x = torch.randn(8, tokens // 8, dim, device="cuda", requires_grad=True)
    grad = torch.randn(8, tokens // 8, dim, device="cuda")
    forwards = {
        f"dense SwiGLU, width {K * width}": lambda t: dense(t)[0],
        "moe_lab reference": lambda t: ours(t)[0],
        "moe_lab reference (expert loop)": lambda t: loop(t)[0],
    }
    if megablocks_available():
        mb = MegaBlocksMoE(dim, replace(cfg, backend="megablocks"), n_layers=1).cuda()
        mb.load_state_dict(ours.state_dict())
        forwards["moe_lab megablocks"] = lambda t: mb(t)[0]
    # bf16 weights: torch._grouped_mm is not on autocast's list, so fp32 weights would run fp32
    block = hf_block(ours).to(BF16)
    block.experts.config._experts_implementation = "grouped_mm"
    forwards["transformers grouped_mm, bf16"] = lambda t: block(t.to(BF16))
    forwards = {key: _autocast(fn) for key, fn in forwards.items()}
    with torch.no_grad():
        expected = forwards["moe_lab reference"](x)
        for key, fn in forwards.items():
            if not key.startswith("dense"):
                assert _rel(fn(x), expected) < 2e-2, key  # bf16 arithmetic on both sides
    runs = {key: fwd_bwd(fn, x, grad) for key, fn in forwards.items()}
    return runs, {key: _peak_mib(run) for key, run in runs.items()}


def step_variants() -> dict:
    x = torch.randint(0, STEP.vocab_size, (8, STEP.max_seq_len), device="cuda")
    targets = x.roll(-1, dims=1)
    models = {"dense": STEP}
    moe = replace(STEP, ffn_hidden=STEP_MOE.expert_hidden, moe=STEP_MOE)
    models["moe_lab reference"] = moe
    if megablocks_available():
        models["moe_lab megablocks"] = replace(moe, moe=replace(STEP_MOE, backend="megablocks"))

    def step(cfg):
        model = build_model(cfg, device="cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def run():
            with torch.autocast("cuda", dtype=BF16):
                loss, aux, _ = model.loss(x, targets)
            (loss + aux).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    return {key: step(cfg) for key, cfg in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench/results/moe_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/moe_gpu.py needs CUDA; bench/moe_layer.py is the CPU benchmark")
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layer": {}}
    for dim, width, tokens in LAYERS:
        variants, peak_mib = layer_variants(dim, width, tokens)
        medians, peak = interleaved(variants, args.rounds, args.warmup, device="cuda")
        title = (
            f"MoE layer fwd+bwd, bf16 autocast: E={E} k={K} d={dim} F={width}, {tokens} tokens "
            f"(bf16 mm peak {peak / 1e12:.0f} TFLOP/s)"
        )
        base = f"dense SwiGLU, width {K * width}"
        mib = ("memory above weights", "peak_mib", peak_mib)
        results["layer"][f"d{dim}_F{width}"] = ratio_table(title, medians, base, mib, digits=2)
        del variants
        torch.cuda.empty_cache()
    medians, peak = interleaved(step_variants(), args.rounds, args.warmup, device="cuda")
    title = (
        f"training step, {STEP.n_layers} layers d={STEP.dim}, 8 x {STEP.max_seq_len} tokens, "
        f"MoE E={E} k={K} F={STEP_MOE.expert_hidden} (bf16 mm peak {peak / 1e12:.0f} TFLOP/s)"
    )
    results["step"] = ratio_table(title, medians, "dense", digits=2)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
