"""Stage 2's update on 2 processes (gloo, CPU) equals the 1-process update on the same rollout batch:
each rank holds some of the prompts (one rank may hold none); the token-mean denominator, ε(τ)'s
normaliser and the gradient are reduced over the ranks. Also the evaluation helpers that drop the
padding a distributed sampler adds."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from eagrl.distributed import unique_in_order, unique_records
from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
from eagrl.rl.grpo import Rollout, group_advantages
from eagrl.rl.step import UpdateConfig, optimise

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them

TOLERANCE = 1e-5  # relative, on the loss and statistics; 1e-6 absolute on the updated weights
CONFIG = UpdateConfig(ppo_epochs=2, adaptive_clip=True, kl_coef=0.05, backend="torch")


def _model():
    torch.manual_seed(0)
    model, _ = load_backbone(BackboneOptions(name="tiny-random-llama", lora=LoraOptions(rank=4, alpha=8, dropout=0.0)))
    return model


def _rollout(n_prompts: int, group: int = 3) -> Rollout:
    generator = torch.Generator().manual_seed(n_prompts)
    prompt_ids = [torch.randint(5, 4000, (int(torch.randint(4, 9, (1,), generator=generator)),), generator=generator).tolist() for _ in range(n_prompts)]
    completions = [torch.randint(5, 4000, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator).tolist() for _ in range(n_prompts * group)]
    rewards = torch.randn(n_prompts * group, generator=generator)
    key_mask = [[bool(k % 2) for k in range(len(c))] for c in completions]
    flags = torch.ones(n_prompts * group, dtype=torch.bool)
    advantages = group_advantages(rewards.view(n_prompts, group)).flatten()
    return Rollout(prompt_ids, completions, [""] * len(completions), rewards, rewards, rewards, flags, advantages, key_mask, group)


def _update(rollout: Rollout, mini_batch: int | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    stats = optimise(model, optimizer, rollout, replace(CONFIG, mini_batch_size=mini_batch))
    return stats, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, port: int, n_prompts: int, out: str, mini_batch: int | None) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rollout = _rollout(n_prompts)
        mine = rollout.select_groups(torch.tensor([p % world == rank for p in range(n_prompts)]))
        torch.save(_update(mine, mini_batch), f"{out}/rank{rank}.pt")
        torch.distributed.barrier()  # both ranks done before gloo is torn down (a rank leaving early aborted once in CI)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "n_prompts, mini_batch",
    [(2, None), (3, None), (1, None), (3, 2), (1, 2)],
    ids=["one-prompt-each", "uneven", "one-rank-empty", "uneven-mini-batches-of-2", "one-rank-empty-mini-batches-of-2"],
)
def test_two_process_update_equals_one_process(n_prompts, mini_batch, tmp_path):
    """With mini-batches (of 2 completions, across prompt boundaries), the 2 ranks step through the
    one-process mini-batches: the same number of steps and the same weights."""
    _model()  # the tokenizer conversion is cached before the workers start
    mp.spawn(_worker, args=(2, _free_port(), n_prompts, str(tmp_path), mini_batch), nprocs=2, join=True)
    want_stats, want_weights = _update(_rollout(n_prompts), mini_batch)
    for rank in range(2):
        stats, weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in want_stats.items():
            if (name != "grad_norm" or n_prompts > 0) and value == value:  # NaN: a statistic with nothing to average
                assert stats[name] == pytest.approx(value, rel=TOLERANCE, abs=1e-7), (rank, name)
        for name, value in want_weights.items():
            torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0, msg=name)


def test_padding_of_a_distributed_sampler_is_dropped_in_dataset_order():
    # two ranks of a 5-sample split: rank 0 got 0, 2, 4; rank 1 got 1, 3 and 0 again (padding)
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    probs = torch.tensor([0.0, 0.2, 0.4, 0.1, 0.3, 0.0])
    kept_index, kept_probs = unique_in_order(index, probs)
    assert kept_index.tolist() == [0, 1, 2, 3, 4] and torch.allclose(kept_probs, torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]))
    records = [{"id": "c"}, {"id": "a"}, {"id": "b"}, {"id": "a", "again": True}]
    assert [r["id"] for r in unique_records(records, {"a": 0, "b": 1, "c": 2})] == ["a", "b", "c"]
    assert "again" not in unique_records(records, {"a": 0, "b": 1, "c": 2})[0]
