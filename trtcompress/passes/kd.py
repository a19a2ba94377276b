"""Distillation recovery (KD): a short fine-tune of the compressed model against the uncompressed
teacher's logits, training only low-rank adapters (LoRA) on the decoder linears.

Loss: KL(p_teacher ‖ p_student) per token (temperature T, scaled by T²), on the calibration text cut into
`seq_len` chunks. Compressed weights stay frozen (pruned positions stay pruned, codes stay codes); each
adapter adds x·Bᵀ·Aᵀ. After training, adapters on compressed layers are kept as low-rank factors in the
CompressedLinearState (appended to EoRA's, if any), adapters on plain float layers are merged into the
weight (`merge: auto`). The budget is a step count plus an optional wall-clock cap (`max_seconds`), both
in the recipe; the progress bar shows the loss.

Precision: with `precision: auto` (default) the forwards and backwards run under bfloat16 autocast when
the CPU has native bf16 matmuls (oneDNN, AVX512-BF16 / AMX) or on a GPU, float32 otherwise. Adapters,
optimizer state and the KL stay float32. On the 2-core AVX512-BF16 machine a step of 2 x 256 tokens
takes 2.7 CPU-s instead of 6.0 in float32, so the same CPU budget buys 2.2x more steps.

The teacher is the model as it was before the recipe's first pass (builders/compress.py keeps a copy
when a pass needs it).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trtcompress.compressed.linear import CompressedLinear, set_module
from trtcompress.errors import CalibrationError, CompressionError
from trtcompress.passes.base import Pass, PassConfig, PassContext, register_pass
from trtcompress.passes.eora import with_lowrank
from trtcompress.passes.pruning import DTYPES
from trtcompress.passes.targets import select_linears

TEACHER = "teacher"  # in `needs`: builders/compress.py keeps an uncompressed copy in context.teacher


class LoRAAdapter(nn.Module):
    """A frozen linear (its effective weight, decoded once) plus a trainable x·Bᵀ·Aᵀ·scale."""

    def __init__(self, base: nn.Module, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        state = base.state if isinstance(base, CompressedLinear) else None
        # An activation quantizer must run on every call; otherwise decode the weight once.
        self.decoded = state is None or getattr(state, "act_quant", None) is None
        if self.decoded:
            weight = state.weight() if state is not None else base.weight.detach().float()
            self.register_buffer("frozen_weight", weight, persistent=False)
            bias = state.bias if state is not None else base.bias
            self.register_buffer(
                "frozen_bias", None if bias is None else bias.detach().float(), persistent=False
            )
        out_f, in_f = base.out_features, base.in_features
        # On the base's device (a model on a GPU), though drawn from the CPU generator (seeded, portable).
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        b = torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f)
        self.lora_b = nn.Parameter(b.to(device))
        self.lora_a = nn.Parameter(torch.zeros(out_f, rank, device=device))  # starts as the identity function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.frozen_weight.to(x.dtype), self.frozen_bias) if self.decoded else self.base(x)
        return y + F.linear(F.linear(x, self.lora_b.to(x.dtype)), self.lora_a.to(x.dtype)) * self.scale


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student) at temperature T, times T² (gradient scale)."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * t * t


class KDConfig(PassConfig):
    method: Literal["kd"] = "kd"
    steps: int = Field(60, ge=1, description="optimizer steps (the budget)")
    max_seconds: float | None = Field(600, gt=0, description="stop earlier once this much time passed")
    clock: Literal["wall", "cpu"] = Field(
        "wall", description="what max_seconds counts: wall time, or this process's CPU time (shared machines)"
    )
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scale = alpha / rank")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (cosine decay to 10%)")
    batch_size: int = Field(2, ge=1, description="sequences per step")
    seq_len: int = Field(256, ge=8, description="tokens per sequence (calibration rows are cut to this)")
    temperature: float = Field(1.0, gt=0, description="distillation temperature")
    merge: Literal["auto", "never"] = Field(
        "auto", description="auto: merge adapters into plain float layers, keep factors on compressed ones"
    )
    factor_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="kept factors")
    seed: int = Field(  # torch.Generator.manual_seed's range: past it, an Overflow traceback mid-build
        0, ge=-(2**63), le=2**64 - 1, description="adapter init and batch order"
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="autocast dtype of the forward/backward; auto: bfloat16 where matmuls are native"
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain float32)."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native else None


@register_pass
class KDPass(Pass):
    config_type = KDConfig
    config: KDConfig
    needs = frozenset({"calibration", TEACHER})

    def __init__(self, config: KDConfig) -> None:
        super().__init__(config)
        self.history: list[dict[str, float]] = []  # step, seconds, loss

    def _batches(self, calibration: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        ids = calibration.reshape(-1)
        n = ids.numel() // cfg.seq_len
        if n < 1:
            raise CalibrationError(f"kd: fewer than seq_len={cfg.seq_len} calibration tokens")
        chunks = ids[: n * cfg.seq_len].view(n, cfg.seq_len)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        return chunks[order]

    def apply(self, model: nn.Module, context: PassContext) -> None:
        cfg = self.config
        if context.calibration is None:
            raise CalibrationError("kd needs calibration text, and none was provided")
        teacher = context.teacher
        if teacher is None:
            raise CompressionError("kd needs the uncompressed teacher (context.teacher), and none was kept")
        selected = list(select_linears(model, cfg.targets, cfg.exclude))
        if not selected:
            raise CompressionError(f"kd: no linear layer matches targets={cfg.targets} minus {cfg.exclude}")
        too_small = [f"{n} ({m.out_features}x{m.in_features})" for n, m in selected
                     if cfg.rank > min(m.out_features, m.in_features)]  # fmt: skip
        if too_small:
            raise CompressionError(
                f"kd: LoRA rank {cfg.rank} exceeds min(out, in) of {', '.join(too_small[:4])}; lower `rank`"
            )
        generator = torch.Generator().manual_seed(cfg.seed)
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        adapters = {}
        for name, module in selected:
            adapters[name] = LoRAAdapter(module, cfg.rank, cfg.alpha / cfg.rank, generator)
            set_module(model, name, adapters[name])
        try:
            self._train(model, teacher, adapters, self._batches(context.calibration), context)
        finally:
            for name, adapter in adapters.items():
                set_module(model, name, self._finalize(adapter))
            for p in frozen:
                p.requires_grad_(True)
        head, embeddings = getattr(model, "lm_head", None), model.get_input_embeddings()
        if isinstance(head, nn.Linear) and embeddings is not None and head.weight is not embeddings.weight:
            model.config.tie_word_embeddings = False  # lm_head got its own (merged) weight

    def _train(self, model, teacher, adapters, chunks: torch.Tensor, context: PassContext) -> None:
        cfg = self.config
        params = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
        )
        progress = context.progress
        task = progress.add_task("kd", total=cfg.steps) if progress else None
        clock = time.perf_counter if cfg.clock == "wall" else time.process_time
        start = clock()
        teacher.eval()
        model.eval()  # no dropout in these models; eval keeps HF from caching anything
        device = next(iter(adapters.values())).lora_a.device
        dtype = autocast_dtype(cfg.precision, device)
        if dtype is not None:
            context.log(f"kd: forward/backward under {dtype} autocast (precision: {cfg.precision})")
        for step in range(cfg.steps):
            first = (step * cfg.batch_size) % len(chunks)
            batch = chunks[first : first + cfg.batch_size].to(device)
            with torch.no_grad(), _autocast(device, dtype):
                target = teacher(input_ids=batch, use_cache=False).logits
            with torch.enable_grad():
                with _autocast(device, dtype):
                    logits = model(input_ids=batch, use_cache=False).logits
                loss = kd_loss(logits, target, cfg.temperature)  # float32 softmaxes
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            schedule.step()
            seconds = clock() - start
            value = float(loss.detach())
            self.history.append({"step": step + 1, "seconds": seconds, "loss": value})
            if task is not None:
                progress.update(task, advance=1, description=f"kd loss {value:.4f}")  # type: ignore[union-attr]
            out_of_time = cfg.max_seconds is not None and seconds >= cfg.max_seconds
            if (step + 1) % 10 == 0 or step == 0 or step + 1 == cfg.steps or out_of_time:
                context.log(f"kd: step {step + 1}/{cfg.steps} loss {value:.4f} ({seconds:.0f} s)")
            if out_of_time:
                context.log(
                    f"kd: {cfg.clock} time budget {cfg.max_seconds:g} s reached after {step + 1} steps"
                )
                break
        if task is not None:
            progress.remove_task(task)  # type: ignore[union-attr]

    def _finalize(self, adapter: LoRAAdapter) -> nn.Module:
        a = (adapter.lora_a.detach() * adapter.scale).float()
        b = adapter.lora_b.detach().float()
        base = adapter.base
        if isinstance(base, CompressedLinear):
            return CompressedLinear(with_lowrank(base.state, a, b, DTYPES[self.config.factor_dtype]))
        if self.config.merge == "auto":
            # A new tensor, not an in-place add: a tied lm_head shares its weight with the input
            # embeddings, which must not change with it (`apply` unties the config).
            merged = (base.weight.detach() + (a @ b).to(base.weight.dtype)).contiguous()
            base.weight = nn.Parameter(merged)
            return base
        from trtcompress.compressed.linear import linear_state

        return CompressedLinear(with_lowrank(linear_state(base), a, b, DTYPES[self.config.factor_dtype]))
