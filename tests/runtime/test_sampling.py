"""The sampler on fixed logits: its distribution is HF `generate`'s (TemperatureLogitsWarper, then
TopKLogitsWarper, then TopPLogitsWarper, softmaxed), computed, not read off samples."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trtcompress.runtime.sampling import SamplingParams, make_generator, probabilities, sample

INF = float("inf")


def _hf(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's distribution, its warpers applied as `generate` builds them (each only where it acts)."""
    scores, ids = logits[None].clone(), torch.zeros(1, 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.softmax(-1)[0]


def _log(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


@pytest.mark.parametrize(
    ("logits", "temperature", "top_k", "top_p"),
    [
        # tokens tied at the top-p boundary: one of the two 0.3s stays, the later one as in HF (the
        # sampler kept the earlier one, a distribution HF never gives)
        (_log(0.4, 0.3, 0.3), 1.0, 0, 0.6),
        (_log(0.2, 0.2, 0.2, 0.2, 0.2), 1.0, 0, 0.5),
        (_log(0.1, 0.3, 0.3, 0.3), 1.0, 0, 0.5),
        (_log(0.3, 0.3, 0.4), 0.7, 0, 1e-9),  # only the top token
        (torch.tensor([2.0, 2.0, 1.0]), 1.0, 0, 1e-9),  # tied top tokens: one of them, HF's
        (_log(0.5, 0.3, 0.2), 1.0, 0, 0.8),  # mass exactly at the boundary
        (_log(0.5, 0.25, 0.25), 1.0, 0, 0.5),
        (torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 1.0, 2, 1.0),  # ties at the k-th logit all stay
        (torch.tensor([0.5, -1.0, 3.0, 2.0]), 0.7, 50, 1.0),  # top_k beyond the vocabulary: no filter
        (torch.tensor([5.0, 1.0, 0.0]), 1.0, 0, 1e-9),  # top_p keeping a single token
        (torch.tensor([1.0, 2.0, 1.999]), 1e-30, 0, 1.0),  # a temperature near 0: the top token
        (torch.tensor([0.3, -2.0, 1.0, 4.0]), 1e6, 0, 1.0),  # a huge one: near uniform
        (torch.tensor([-INF, 1.0, 2.0, -INF, 0.5]), 0.8, 3, 0.9),  # -inf logits stay impossible
        (torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3, 1.3, 10, 0.7),
        ((torch.randn(64, generator=torch.Generator().manual_seed(1)) * 4).round(), 0.9, 0, 0.8),
    ],
)
def test_the_distribution_is_hf_generates(logits, temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    ours, hf = probabilities(logits, params), _hf(logits, temperature, top_k, top_p)
    assert torch.equal(ours > 0, hf > 0)
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)


def test_ties_at_the_top_p_boundary_are_broken_the_same_way_at_any_vocabulary_size(monkeypatch):
    """HF's torch.sort is not stable on long rows (its choice among tied tokens is then arbitrary); ours
    is, and keeps what HF keeps wherever HF's sort is stable."""
    gen = torch.Generator().manual_seed(2)
    real_sort = torch.sort

    def stable_sort(x, descending=False, **kw):  # HF's sort as it orders ties on short rows
        return real_sort(x, descending=descending, stable=True)

    for vocab in (16, 1000, 4096):
        logits = (torch.randn(vocab, generator=gen) * 4).round() / 2  # many exact ties
        for top_p in (0.3, 0.7, 0.95):
            with monkeypatch.context() as m:
                m.setattr(torch, "sort", stable_sort)
                hf = _hf(logits, 1.0, 0, top_p)
            ours = probabilities(logits, SamplingParams(temperature=1.0, top_p=top_p))
            assert torch.equal(ours > 0, hf > 0), (vocab, top_p)


def test_greedy_ties_go_to_the_first_index_and_seeded_rows_do_not_depend_on_each_other():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.5, 0.5, 0.2], [2.0, 2.0, 2.0, 2.0]])
    greedy = SamplingParams()
    assert sample(logits, [greedy] * 3, [None] * 3) == torch.argmax(logits, -1).tolist() == [1, 1, 0]

    def draws(rows: list[int], seeds: list[int]) -> list[list[int]]:
        gens = [make_generator(s) for s in seeds]
        params = [SamplingParams(temperature=1.0, seed=s) for s in seeds]
        return [sample(logits[rows], params, gens) for _ in range(20)]

    alone = [d[0] for d in draws([2], [1])]
    assert [d[1] for d in draws([0, 2], [7, 1])] == alone  # another row, another seed: same draws
    assert [d[0] for d in draws([2, 2], [1, 1])] == alone
    assert len(set(alone)) > 1  # (a tie of four: not one token drawn every time)
