"""EleutherAI lm-evaluation-harness adapter: any moe_lab model as the lm-eval model ``moe_lab``.

:class:`MoeLabLM` wraps a :class:`~moe_lab.eval.scoring.Scorer`, so dense and MoE runs, routed
expert ensembles and information-flow-control models (what one principal may run under a policy) are
all evaluated the same way::

    moe-lab harness runs/mine --tasks hellaswag
    moe-lab harness runs/ifc --principal alice --policy policy.yaml --tasks ...

or in Python, ``lm_eval.simple_evaluate(model=MoeLabLM(scorer), tasks=[...])``. The registration
as ``moe_lab`` happens when this module is imported: lm-eval's own ``lm_eval --model`` command
line has no plugin hook that would import it. lm-eval is an
optional dependency (``pip install moe_lab[eval]``); it is imported only here, and
:func:`harness_lm` (or importing this module) raises an ImportError that says how to install it.

Conventions, from lm-eval's model guide (``docs/model_guide.md``): every request is conditioned on
BOS, so an empty context scores the continuation from BOS alone; a request longer than the
context keeps its continuation and the right end of its context; ``is_greedy`` is True iff every
continuation token is the argmax of the model's distribution at its position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from moe_lab.eval.scoring import Scorer, encode_pair, rolling_windows
from moe_lab.families.loading import load_scorer

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "moe_lab.interop.harness needs lm-evaluation-harness: pip install 'lm-eval>=0.4' "
        "(moe_lab's extra: pip install -e '.[eval]')"
    ) from e

__all__ = ["MoeLabLM", "evaluate_harness"]

log = logging.getLogger(__name__)


@register_model("moe_lab")
class MoeLabLM(LM):
    """An lm-eval ``LM`` over a moe_lab :class:`~moe_lab.eval.scoring.Scorer`.

    Args:
        scorer: the model to evaluate; or None with ``run_dir`` (lm-eval's ``--model_args``).
        run_dir: a run, experts or information-flow-control directory (see
            :func:`~moe_lab.families.loading.load_scorer`), loaded with ``principal``, ``policy``,
        ``lang``. max_gen_toks: the generation length when a request does not set ``max_gen_toks``.
        overrides: ``key=value`` changes to the saved config; as one string (``--model_args``),
            separated by ``;`` since lm-eval splits its model arguments at commas.
    """

    def __init__(
        self,
        scorer: Scorer | None = None,
        run_dir: str | None = None,
        principal: str | None = None,
        policy: str | None = None,
        lang: str | None = None,
        device: str = "cpu",
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        overrides: str | Sequence[str] = (),
    ) -> None:
        super().__init__()
        if (scorer is None) == (run_dir is None):
            raise ValueError("pass exactly one of scorer and run_dir")
        if scorer is None:
            batch = int(batch_size) if str(batch_size).isdigit() else 8  # lm-eval may say "auto"
            if isinstance(overrides, str):
                overrides = [o for o in overrides.split(";") if o]
            scorer = load_scorer(
                run_dir,
                overrides,
                principal=principal,
                policy=policy,
                lang=lang,
                device=device,
                batch_size=batch,
            )
        self.scorer, self.max_gen_toks = scorer, int(max_gen_toks)
        self.tokenizer = scorer.tokenizer
        self._device = scorer.device

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """``BOS + ctx + cont`` cut to the model's context from the left; the continuation's
        length is kept whole (a continuation longer than the context cannot be scored)."""
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        if len(cont) > self.scorer.max_len:
            raise ValueError(
                f"a continuation of {len(cont)} tokens exceeds the context ({self.scorer.max_len})"
            )
        seq = [self.tokenizer.bos_id, *ctx, *cont]
        return seq[-(self.scorer.max_len + 1) :], len(cont)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(log p(continuation | BOS + context), is_greedy)`` for each ``(context,
        continuation)`` request."""
        seqs, lengths = [], []
        for req in requests:
            context, continuation = req.args
            seq, n = self._fit(*encode_pair(self.tokenizer, context, continuation))
            seqs.append(seq)
            lengths.append(n)
        results = []
        for s, n in zip(self.scorer.score(seqs, progress=True), lengths, strict=True):
            results.append((float(s.logprobs[-n:].sum(dtype="float64")), bool(s.greedy[-n:].all())))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """``log p(text | BOS)`` of each ``(text,)`` request, in disjoint windows of the model's
        context when the text is longer (:func:`~moe_lab.eval.scoring.rolling_windows`)."""
        seqs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tokenizer.encode(text)
            for seq, n in rolling_windows(tokens, self.tokenizer.bos_id, self.scorer.max_len):
                seqs.append(seq)
                owner.append((i, n))
        totals = [0.0] * len(requests)
        for lp, (i, n) in zip(self.scorer.token_logprobs(seqs, progress=True), owner, strict=True):
            totals[i] += float(lp[-n:].sum(dtype="float64"))
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy continuation of each ``(context, {"until": [...], "max_gen_toks": n})``
        request, cut before the first ``until`` string."""
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                log.warning("moe_lab generates greedily; ignoring sampling arguments %s", kwargs)
            prompt = [self.tokenizer.bos_id, *self.tokenizer.encode(context)]
            # Keep room for the generation: drop the oldest context tokens, as lm-eval's HFLM does.
            keep = max(1, self.scorer.max_len - max_new)
            prompt = prompt[-keep:]
            new = self.scorer.greedy(prompt, max_new, until)
            text = self.tokenizer.decode(t for t in new if t != self.tokenizer.eos_id)
            for u in until:
                text = text.split(u, 1)[0]
            out.append(text)
        return out


def evaluate_harness(
    lm: MoeLabLM,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | Path | None = None,
) -> dict:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks``: its result dict.

    Args:
        include_path: a directory of task YAML files (e.g. ``dataset_path: json`` with local
            ``data_files``). lm-eval's ~10k built-in tasks are indexed only if a task is not
            found there: indexing them takes tens of seconds.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(manager.match_tasks([t]) for t in tasks):
            manager = TaskManager(include_path=str(include_path))
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager
    )
