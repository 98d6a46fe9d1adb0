import json

import pytest
import torch

# The short training runs of the integration tests. Their final evaluation scores the whole
# validation set: 32 rows a batch, not the 4 of training.
SHORT_RUN = [
    "train.seq_len=64",
    "train.batch_size=4",
    "train.eval_batch_size=32",
    "train.progress=false",
    "train.warmup_steps=1",
]


def to_bf16_grid(module: torch.nn.Module) -> None:
    """Round the weights to bf16 values (kept fp32): bf16 and fp32 runs start from the same
    numbers, so only the arithmetic differs."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def backend_pair(layer, backend: str, dim: int, **moe):
    """A reference MoE layer and a ``layer`` (the class of ``backend``) holding the same
    weights; ``moe``: MoEConfig fields over 8 experts, top-2."""
    from dataclasses import replace

    from moe_lab.config import MoEConfig
    from moe_lab.nn.experts import MoE

    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, **moe})
    ref = MoE(dim, cfg, n_layers=2, init_std=0.1)
    ref.reset_parameters()
    other = layer(dim, replace(cfg, backend=backend), n_layers=2, init_std=0.1)
    other.load_state_dict(ref.state_dict())
    return ref, other


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in Frobenius norm, computed in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_layer(layer, x: torch.Tensor, grad: torch.Tensor):
    """An MoE layer's forward and backward (output gradient ``grad``, plus a loss on the router's
    stats so its gradient path runs too): ``(y, stats, dx, {name: weight gradient})``."""
    x = x.clone().requires_grad_()
    y, stats = layer(x)
    aux = stats.probs_E.square().sum() + stats.lse_sq
    (y * grad).sum().add(aux).backward()
    return y, stats, x.grad, {n: p.grad for n, p in layer.named_parameters()}


def assert_bf16_parity_on_cuda(ref, other, dim: int, autocast: bool = False) -> None:
    """``other`` (a bf16 backend given ``ref``'s weights rounded to bf16) against the reference
    on CUDA: outputs, input and weight gradients to bf16 precision, the router stats exactly (one
    router: the same decisions). ``autocast``: both run under bf16 autocast."""
    to_bf16_grid(ref)
    other.load_state_dict(ref.state_dict())
    ref, other = ref.cuda(), other.cuda()
    x = torch.randn(4, 256, dim, device="cuda").to(torch.bfloat16).float()
    grad = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y_r, s_r, dx_r, g_r = run_layer(ref, x, grad)
        y_o, s_o, dx_o, g_o = run_layer(other, x, grad)
    assert rel_error(y_o, y_r) < 1e-2
    assert rel_error(dx_o, dx_r) < 2e-2
    for name in g_r:
        assert rel_error(g_o[name], g_r[name]) < 2e-2, name
    for a, b in zip(s_o, s_r, strict=True):
        torch.testing.assert_close(a, b)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session directory, never to the user's ~/.cache."""
    monkeypatch.setenv("MOE_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "moe_lab_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def lang_files(tmp_path):
    """Small two-language train/valid jsonl files with a `lang` group field."""
    words = {
        "en": "the cat sat on the mat and looked at a dog".split(),
        "de": "der hund lief über die straße und sah eine katze".split(),
    }
    gen = torch.Generator().manual_seed(0)

    def doc(lang, n):
        idx = torch.randint(0, len(words[lang]), (n,), generator=gen).tolist()
        return {"text": " ".join(words[lang][i] for i in idx), "lang": lang}

    train = [doc("en" if i % 3 else "de", 40 + i % 17) for i in range(120)]
    valid = [doc("en" if i % 2 else "de", 30 + i) for i in range(12)]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(
        tmp_path / "valid.jsonl", valid
    )
