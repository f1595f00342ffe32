"""A GPT-2 causal LM cut into pipeline stages for ``torch.distributed.pipelining``, with synthetic data.

Shared by the GPT recipes (no Lightning in here). The layout of ``pp x dp`` ranks is
``rank = dp_index * pp + pp_index``: one pipeline per ``dp_index``, and the ranks that hold the
same stages in different pipelines form a data-parallel group. A rank runs model stages
``pp_index, pp_index + pp, ...`` (one per virtual stage).

Stage 0 holds the embeddings, the last stage the final LayerNorm and the (untied) LM head, so
by default the last stage is the heaviest: the imbalance Perseus turns into energy savings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

SCHEDULES: dict[str, type[_PipelineSchedule]] = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "zero-bubble": ScheduleInterleavedZeroBubble,
}
SINGLE_STAGE_SCHEDULES = ("1f1b", "gpipe")  # these run exactly one model stage per rank
DEFAULT_VIRTUAL_STAGES = {"interleaved-1f1b": 2}  # model stages per rank; 1 for the others


@dataclass
class GPTConfig:
    """Model size: a small GPT-2 by default, so that CPU runs take seconds."""

    vocab_size: int = 8192
    seq_len: int = 128
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4


class GPTStage(nn.Module):
    """Stage ``index`` of ``num_stages``: [embeddings] + transformer blocks + [final LayerNorm and LM head].

    Maps token ids (stage 0) or hidden states to hidden states, or to logits on the last stage.
    """

    def __init__(self, model: GPT2LMHeadModel, blocks: range, index: int, num_stages: int) -> None:
        super().__init__()
        transformer = model.transformer
        self.first, self.last = index == 0, index == num_stages - 1
        self.wte = transformer.wte if self.first else None
        self.wpe = transformer.wpe if self.first else None
        self.h = nn.ModuleList(transformer.h[i] for i in blocks)
        self.ln_f = transformer.ln_f if self.last else None
        self.lm_head = model.lm_head if self.last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.h:
            x = block(x)  # no mask: SDPA attention is then causal
        if self.last:
            x = self.lm_head(self.ln_f(x))
        return x


def split_layers(n_layer: int, num_stages: int) -> list[int]:
    """Transformer blocks per stage, as even as possible (earlier stages take the remainder)."""
    if n_layer < num_stages:
        raise ValueError(f"{n_layer} layers cannot fill {num_stages} stages; raise --n-layer")
    return [n_layer // num_stages + (i < n_layer % num_stages) for i in range(num_stages)]


def build_stages(config: GPTConfig, layers_per_stage: list[int], indices: list[int], seed: int = 0) -> list[GPTStage]:
    """The model stages ``indices`` of a randomly initialised GPT-2 cut by ``layers_per_stage``.

    Every rank builds the whole model from ``seed`` and keeps its stages, so that the replicas of
    a stage in different pipelines start equal.
    """
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.seq_len,
        n_embd=config.n_embd,
        n_layer=sum(layers_per_stage),
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,  # the embeddings and the LM head live on different stages
        bos_token_id=None,
        eos_token_id=None,
    )
    hf_config._attn_implementation = "sdpa"  # causal without a mask (GPTStage passes none)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config)
    num_stages, starts = len(layers_per_stage), [sum(layers_per_stage[:i]) for i in range(len(layers_per_stage))]
    return [GPTStage(model, range(starts[i], starts[i] + layers_per_stage[i]), i, num_stages) for i in indices]


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``targets`` are the inputs shifted by one token."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def process_groups(pp: int, dp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's pipeline group and data-parallel group (every rank must call this)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dp, pp), mesh_dim_names=("dp", "pp"))
    return mesh.get_group("pp"), mesh.get_group("dp")


def stage_indices(pp_index: int, pp: int, virtual_stages: int) -> list[int]:
    """The model stages of the rank at position ``pp_index`` of its pipeline (looped placement)."""
    return [pp_index + v * pp for v in range(virtual_stages)]


def build_schedule(
    name: str,
    modules: list[GPTStage],
    indices: list[int],
    num_stages: int,
    microbatches: int,
    device: torch.device,
    group: dist.ProcessGroup,
) -> _PipelineSchedule:
    """Wrap this rank's ``modules`` (model stages ``indices``) in ``PipelineStage`` objects and schedule them."""
    stages = [PipelineStage(m, i, num_stages, device, group=group) for m, i in zip(modules, indices)]
    if name in SINGLE_STAGE_SCHEDULES:
        return SCHEDULES[name](stages[0], microbatches, loss_fn=causal_lm_loss)
    return SCHEDULES[name](stages, microbatches, loss_fn=causal_lm_loss)


def check_schedule(name: str, pp: int, virtual_stages: int, microbatches: int) -> None:
    """Raise ``ValueError`` for a pipeline layout that ``name`` cannot run."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if name in SINGLE_STAGE_SCHEDULES and virtual_stages != 1:
        raise ValueError(f"{name} runs one model stage per rank; use --virtual-stages 1")
    if name == "1f1b" and microbatches < pp:
        raise ValueError(f"1f1b needs at least as many microbatches as stages ({pp}) in torch 2.13")


def all_reduce_grads(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Average the gradients of ``module`` over ``group`` (the replicas of the same stages), in one bucket."""
    size = dist.get_world_size(group)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(reduced.view_as(grad))


class SyntheticTokens(Dataset):
    """``length`` batches of ``(inputs, targets)`` token ids, each ``batch_size x seq_len``.

    Tokens are drawn independently with Zipf-like frequencies (token ``k`` about ``1 / (k + 10)``),
    so the loss falls as the model learns them. Batch ``i`` depends only on ``seed`` and ``i``:
    every stage of a pipeline sees the same batches, and pipelines with different seeds see
    different ones.
    """

    def __init__(self, length: int, batch_size: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.length, self.batch_size, self.seq_len, self.seed = length, batch_size, seq_len, seed
        self.frequencies = 1.0 / (torch.arange(vocab_size) + 10.0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        count = self.batch_size * (self.seq_len + 1)
        tokens = torch.multinomial(self.frequencies, count, replacement=True, generator=generator)
        tokens = tokens.view(self.batch_size, self.seq_len + 1)
        return tokens[:, :-1], tokens[:, 1:]
