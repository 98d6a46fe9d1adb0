"""Router rows from data (FlexOlmo): each expert's row is the mean input of the layer's FFN over
its documents, checked against a naive loop that runs one document at a time through the blocks."""

import datasets
import pytest
import torch

from moe_lab import ModelConfig, build_model
from moe_lab.config import ConfigError
from moe_lab.data.packing import build_store
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.ensembles.merge import btx
from moe_lab.ensembles.router_init import mean_ffn_inputs

CFG = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=260, ffn_hidden=48,
                  init_std=0.1)  # fmt: skip
TEXTS = {
    "cats": ["the cat sat on the mat", "a cat and another cat", "cats nap in the sun all day"],
    "code": ["def f(x): return x + 1", "for i in range(10): print(i)", "import os, sys"],
}


def _store(tmp_path, name):
    ds = datasets.Dataset.from_dict({"text": TEXTS[name]})
    return build_store(ds, ByteTokenizer(), "text", [], tmp_path / name)


def _naive_means(model, texts):
    """One document at a time, the blocks written out: the FFN input is ffn_norm of the stream."""
    tok = ByteTokenizer()
    sums, count = [torch.zeros(CFG.dim, dtype=torch.float64) for _ in model.layers], 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos_id, *tok.encode(text)]])  # the inputs: BOS .. x_n
            x = model.tok_embeddings(ids)
            cos, sin = model._rope(torch.arange(ids.shape[1])[None], x.dtype)
            for layer, total in zip(model.layers, sums, strict=True):
                x = x + layer.attention(layer.attention_norm(x), cos, sin, None, None)
                ffn_in = layer.ffn_norm(x)
                total += ffn_in[0].double().sum(0)
                x = x + layer.feed_forward(ffn_in)[0]
            count += ids.shape[1]
    return [(s / count).float() for s in sums]


def test_mean_ffn_inputs_equal_the_naive_loop(tmp_path):
    torch.manual_seed(0)
    model = build_model(CFG)
    got = mean_ffn_inputs(model, _store(tmp_path, "cats"), seq_len=64, batch_size=2)
    for a, b in zip(got, _naive_means(model, TEXTS["cats"]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_btx_router_rows_from_data_are_each_experts_mean_input(tmp_path):
    torch.manual_seed(0)
    experts = [build_model(CFG) for _ in range(2)]
    stores = [_store(tmp_path, "cats"), _store(tmp_path, "code")]
    merged = btx(experts, top_k=1, router_init="data", router_data=stores, seq_len=64)
    for e, name in enumerate(["cats", "code"]):
        expected = _naive_means(experts[e], TEXTS[name])
        for i, layer in enumerate(merged.layers):
            row = layer.feed_forward.router.gate.weight[e]
            torch.testing.assert_close(row, expected[i], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="one token store per expert"):
        btx(experts, router_init="data", router_data=stores[:1])
