"""The OPD + NCA train step written the way a PyTorch user writes it: the reference that
`scripts/bench.py step` measures ctxjax's step against. torch and transformers are imported here
and nowhere in the library.

One step, eager torch on the student and teacher HF models (the same weights as ctxjax's, exported
with `ctxjax.hf.save_model`):

1. sample      transformers `generate` on the left-padded `[x]`: sampled at temperature 1, no top-k
               or top-p, no EOS (every row runs `max_new_tokens`)
2. teacher     a forward on `[c | x | y]` under `torch.no_grad`
3. student     a forward on `[x | y]`
4. student     a forward on `[c | x | y]`
5. loss        full-vocabulary reverse KL(p_s || p_t) on the response tokens
               + beta * KL(sg[p_nc] || p_c), fp32, mean over response tokens
6. update      `clip_grad_norm_` then `torch.optim.AdamW`

As in ctxjax, positions are `cumsum(mask) - 1` (a response token sits at the same RoPE position
in every view) and only the response positions are projected to the vocabulary (`logits_to_keep`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import transformers

from ctxjax.config import OptimConfig

PARTS = ("sample", "teacher", "student", "optimizer")


def load(path: str) -> transformers.PreTrainedModel:
    """An HF folder as an fp32 `<Family>ForCausalLM` in train mode (no dropout in these models)."""
    transformers.utils.logging.disable_progress_bar()  # one bar per load clutters the report
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def response_logits(
    model: transformers.PreTrainedModel,
    prompt_ids_BxP: torch.Tensor,
    prompt_mask_BxP: torch.Tensor,
    resp_BxN: torch.Tensor,
    resp_mask_BxN: torch.Tensor,
) -> torch.Tensor:
    """fp32 logits [B, N, V] that predict each response token: slots P-1 ... P+N-2 of
    `[prompt | response]`, positions `cumsum(mask) - 1` (padding slots at 0, never read)."""
    n = resp_BxN.shape[1]
    ids_BxL = torch.cat([prompt_ids_BxP, resp_BxN], dim=1)
    mask_BxL = torch.cat([prompt_mask_BxP, resp_mask_BxN], dim=1).long()
    positions_BxL = (mask_BxL.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids_BxL,
        attention_mask=mask_BxL,
        position_ids=positions_BxL,
        logits_to_keep=n + 1,  # the last N+1 slots; the very last predicts past the response
        use_cache=False,
    )
    return out.logits[:, :-1].float()


def kl(logp_BxNxV: torch.Tensor, logq_BxNxV: torch.Tensor) -> torch.Tensor:
    """Per-token `KL(p || q) = sum_v p (log p - log q)` -> [B, N]."""
    return (logp_BxNxV.exp() * (logp_BxNxV - logq_BxNxV)).sum(-1)


def distill_loss(
    student: transformers.PreTrainedModel,
    teacher: transformers.PreTrainedModel,
    batch: dict[str, torch.Tensor],
    resp_BxN: torch.Tensor,
    resp_mask_BxN: torch.Tensor,
    beta: float,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Steps 2-5 on fixed response tokens: `(L, {"opd", "nca"})` (the terms as masked means).

    `timings`, when given, gets the seconds of the teacher forward under "teacher"."""
    t0 = time.perf_counter()
    with torch.no_grad():
        t_logp_BxNxV = torch.log_softmax(
            response_logits(
                teacher, batch["ctx_prompt_ids"], batch["ctx_prompt_mask"], resp_BxN, resp_mask_BxN
            ),
            -1,
        )
    if timings is not None:
        timings["teacher"] = time.perf_counter() - t0
    nc_logp_BxNxV = torch.log_softmax(
        response_logits(
            student, batch["prompt_ids"], batch["prompt_mask"], resp_BxN, resp_mask_BxN
        ),
        -1,
    )
    c_logp_BxNxV = torch.log_softmax(
        response_logits(
            student, batch["ctx_prompt_ids"], batch["ctx_prompt_mask"], resp_BxN, resp_mask_BxN
        ),
        -1,
    )
    m_BxN = resp_mask_BxN.float()
    count = m_BxN.sum().clamp(min=1.0)
    opd = (kl(nc_logp_BxNxV, t_logp_BxNxV) * m_BxN).sum() / count
    nca = (kl(nc_logp_BxNxV.detach(), c_logp_BxNxV) * m_BxN).sum() / count
    return opd + beta * nca, {"opd": opd.detach(), "nca": nca.detach()}


def make_optimizer(student: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with ctxjax's hyper-parameters at its peak learning rate (the schedule's shape does
    not change the cost of a step)."""
    return torch.optim.AdamW(
        student.parameters(),
        lr=cfg.learning_rate,
        betas=(cfg.b1, cfg.b2),
        eps=1e-8,  # optax.adamw's default
        weight_decay=cfg.weight_decay,
    )


def update(student: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float) -> None:
    """Step 6 after `backward()`: clip the global norm, step, clear the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def rollout(
    student: transformers.PreTrainedModel,
    prompt_ids_BxP: torch.Tensor,
    prompt_mask_BxP: torch.Tensor,
    new_tokens: int,
) -> torch.Tensor:
    """Step 1: `new_tokens` sampled tokens per row [B, N] (temperature 1, full vocabulary, no EOS:
    `min_new_tokens` keeps every row going)."""
    out = student.generate(
        input_ids=prompt_ids_BxP,
        attention_mask=prompt_mask_BxP.long(),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    return out[:, prompt_ids_BxP.shape[1] :]


@dataclasses.dataclass
class TorchStep:
    """The whole step on a fixed data batch; each call samples, trains once and returns the
    seconds of each part (`PARTS`) and of the step, timed with `perf_counter` (eager torch on the
    CPU is synchronous)."""

    student: transformers.PreTrainedModel
    teacher: transformers.PreTrainedModel
    optim: OptimConfig
    beta: float
    new_tokens: int

    def __post_init__(self):
        self.teacher.eval().requires_grad_(False)
        self.opt = make_optimizer(self.student, self.optim)

    def __call__(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
        torch.manual_seed(seed)
        times = {}
        t0 = time.perf_counter()
        resp_BxN = rollout(self.student, batch["prompt_ids"], batch["prompt_mask"], self.new_tokens)
        t1 = time.perf_counter()
        times["sample"] = t1 - t0
        resp_mask_BxN = torch.ones_like(resp_BxN, dtype=torch.bool)  # no EOS: every token counts
        loss, _ = distill_loss(
            self.student, self.teacher, batch, resp_BxN, resp_mask_BxN, self.beta, times
        )
        loss.backward()
        t2 = time.perf_counter()
        times["student"] = t2 - t1 - times["teacher"]
        update(self.student, self.opt, self.optim.grad_clip)
        t3 = time.perf_counter()
        times["optimizer"] = t3 - t2
        times["step"] = t3 - t0
        return times


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A numpy data batch (`prompt_ids`, `prompt_mask`, `ctx_prompt_ids`, `ctx_prompt_mask`) as
    torch tensors: ids int64, masks bool."""
    return {
        k: torch.from_numpy(np.asarray(v).astype(bool if k.endswith("mask") else np.int64))
        for k, v in batch.items()
    }
