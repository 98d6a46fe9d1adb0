"""The MegaBlocks backend: the reference MoE's router and weights, MegaBlocks' dMoE expert kernels.

Only the expert computation changes hands. Routing stays
:class:`~moe_lab.nn.routing.topk.TopKRouter` (fp32 scores, renormalisation, aux-loss-free bias,
access-policy restriction), so the routing decisions, :class:`~moe_lab.nn.routing.topk.RouterStats`
and every balancing loss are the same on both backends; MegaBlocks' own router (scores in the input
dtype, no renormalisation by default) is not used. The experts run in
``megablocks.layers.dmoe.ParallelDroplessMLP`` (the experts of ``dMoE``) with ``mlp_type="glu"``,
``mlp_impl="grouped"``, silu and no bias: its sort, histogram and fused gather/scatter kernels, and
``grouped_gemm`` per expert segment.

Loss bookkeeping: MegaBlocks keeps its balancing loss and router logits in module-global lists that
the caller must read and clear every step (databricks/megablocks#113). Here ``moe_loss_weight`` and
``moe_zloss_weight`` are 0, so nothing is ever appended: the losses are ours, computed from the
router's stats, and there is nothing to clear.

The parameters are the layer's own ``w1``, ``v1``, ``w2`` (MegaBlocks' GLU layout, see
:mod:`moe_lab.nn.experts.moe`): the MegaBlocks module is built once per device without parameters of
its own and is not a submodule, so the state dict is the reference layer's, key for key, and a
checkpoint moves between backends unchanged. ``grouped_gemm`` computes in bf16 only, so the fp32
master weights and the input are cast to bf16 for the experts (the cast is differentiable; the
optimizer keeps fp32), and the output is cast back.

Expert parallelism passes through: with ``ep_group`` set (:func:`~moe_lab.nn.experts.parallel.
shard_experts`, rank r keeps experts ``[r E/W, (r+1) E/W)``, the slice MegaBlocks expects),
MegaBlocks' ``parallel_forward_once`` does the all-to-all. Its 1/W expert-gradient scaling is
switched off because :class:`~moe_lab.train.distributed.Dist` already averages expert gradients.

MegaBlocks needs CUDA, ``grouped_gemm`` and a torch version it pins (0.10.0: torch 2.7.0); see
``pip install 'moe_lab[gpu]'``, or ``scripts/build_megablocks.sh`` for other torch versions. dMoE is
dropless, so ``capacity_factor`` must be null. ``tests/test_megablocks.py``'s ``gpu`` tests passed
on an H100 (torch 2.11.0+cu130, MegaBlocks 0.10.0 built by that script's steps).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lab.config import ConfigError, MoEConfig
from moe_lab.nn.experts.moe import MoE

__all__ = ["MegaBlocksMoE", "import_megablocks", "megablocks_available"]

_INSTALL = (
    "install it on a CUDA machine with pip install 'moe_lab[gpu]' (MegaBlocks with grouped_gemm; "
    "MegaBlocks 0.10.0 pins torch 2.7.0; for another torch, bash scripts/build_megablocks.sh "
    "builds both against the installed one), or use model.moe.backend=reference"
)


def import_megablocks():
    """MegaBlocks' ``(Arguments, ParallelDroplessMLP)``, or a ConfigError saying how to get them."""
    try:
        import grouped_gemm  # noqa: F401 -- the grouped path asserts it only at the first forward
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import ParallelDroplessMLP
    except (ImportError, OSError, RuntimeError) as e:  # OSError/RuntimeError: a broken CUDA build
        raise ConfigError(
            f"model.moe.backend=megablocks needs the megablocks and grouped_gemm packages, which "
            f"do not import here ({type(e).__name__}: {e}); {_INSTALL}"
        ) from e
    return Arguments, ParallelDroplessMLP


@functools.cache  # asked once per MoE layer; a failed import is not cached by Python
def megablocks_available() -> bool:
    """CUDA is present and MegaBlocks imports: what ``backend: auto`` asks before choosing it."""
    if not torch.cuda.is_available():
        return False
    try:
        import_megablocks()
    except ConfigError:
        return False
    return True


class MegaBlocksMoE(MoE):
    """:class:`~moe_lab.nn.experts.moe.MoE` whose experts run in MegaBlocks' dMoE kernels (CUDA)."""

    def __init__(self, dim: int, cfg: MoEConfig, n_layers: int, init_std: float = 0.02) -> None:
        cfg.validate()  # dropless only, among others
        super().__init__(dim, cfg, n_layers, init_std)
        # (device, ep group) -> ParallelDroplessMLP; a plain dict, so not a submodule
        self._dmoe = {}

    def _dropless_mlp(self, device: torch.device):
        if device.type != "cuda":
            raise RuntimeError(
                f"the megablocks backend runs on CUDA only; this input is on {device}: "
                "move the model to a GPU, or load the weights into backend=reference"
            )
        key = (device, self.ep_group)
        if key not in self._dmoe:
            Arguments, ParallelDroplessMLP = import_megablocks()
            keep = lambda w: w  # noqa: E731 -- its own weights are dropped: no init work, no draws
            args = Arguments(
                hidden_size=self.dim,
                ffn_hidden_size=self.cfg.expert_hidden,
                num_layers=1,
                bias=False,
                return_bias=False,
                activation_fn=F.silu,
                moe_num_experts=self.cfg.num_experts,
                moe_top_k=self.cfg.top_k,
                moe_loss_weight=0.0,  # losses are computed from our router's stats
                moe_zloss_weight=0.0,
                moe_expert_model_parallelism=self.ep_group is not None,
                expert_parallel_group=self.ep_group,
                mlp_type="glu",
                mlp_impl="grouped",
                fp16=False,
                bf16=True,
                device=device,
                init_method=keep,
                output_layer_init_method=keep,
            )
            # Built at the first forward, which a resumed run reaches at a different step: no
            # random draw may leak out of here, or resume would not be exact (router jitter).
            with torch.random.fork_rng(devices=[device]):
                mlp = ParallelDroplessMLP(args)
            for name in ("w1", "v1", "w2"):  # ours are passed in at every forward
                delattr(mlp.mlp, name)
            mlp.mlp.gradient_scale = None  # Dist averages expert gradients over ranks already
            self._dmoe[key] = mlp
        return self._dmoe[key]

    def _experts(
        self, x_TD: Tensor, weights_TK: Tensor, indices_TK: Tensor, kept_TK: Tensor
    ) -> Tensor:
        if indices_TK.shape[1] != self.cfg.top_k:
            # A restriction to fewer experts than top_k shrank k; dMoE maps slot s to token
            # s // top_k with the k it was built with, so the reference path runs these.
            return super()._experts(x_TD, weights_TK, indices_TK, kept_TK)
        mlp = self._dropless_mlp(x_TD.device)
        mlp.train(self.training)
        # Plain attributes (object.__setattr__: never registered as parameters), set per call so
        # they follow .to(), FSDP2 and load_state_dict.
        for name in ("w1", "v1", "w2"):
            object.__setattr__(mlp.mlp, name, getattr(self, name).to(torch.bfloat16))
        y_TD = mlp(x_TD.to(torch.bfloat16).contiguous(), None, weights_TK, indices_TK)
        return y_TD.to(x_TD.dtype)
