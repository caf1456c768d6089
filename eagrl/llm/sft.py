"""Supervised fine-tuning batches: the causal-LM loss on the completion tokens only.

``sft_batch`` tokenises each (prompt, completion) pair, appends the end-of-turn token to the completion,
right-pads the batch and sets ``labels = -100`` on every prompt and padding token, so only the
completion is learnt. ``max_length`` cuts the completion's end (never the prompt) when a pair is too long.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def sft_batch(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask", "labels"}``, each [B, L]; labels are -100 outside completions."""
    rows, masks = [], []
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + end
        if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
            completion_ids = completion_ids[: max(max_length - len(prompt_ids), 1)]
        rows.append(prompt_ids + completion_ids)
        masks.append([False] * len(prompt_ids) + [True] * len(completion_ids))
    longest = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
        learn = torch.tensor(mask)
        labels[b, : len(row)] = torch.where(learn, torch.tensor(row), torch.full_like(learn, -100, dtype=torch.long))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def targets_over_limit(tokenizer, completions: Sequence[str], max_new_tokens: int) -> dict[str, int]:
    """How the SFT targets' lengths compare with the evaluation's answer budget: ``{"targets", "over", "median",
    "longest"}`` in tokens (the end-of-turn token included, as ``sft_batch`` appends it). A target longer than
    ``max_new_tokens`` teaches an answer the evaluation cuts off before its ``<Final Answer>``."""
    end = 1 if tokenizer.eos_token_id is not None else 0
    lengths = sorted(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + end for c in completions)
    if not lengths:
        return {"targets": 0, "over": 0, "median": 0, "longest": 0}
    return {
        "targets": len(lengths),
        "over": sum(n > max_new_tokens for n in lengths),
        "median": lengths[len(lengths) // 2],
        "longest": lengths[-1],
    }
