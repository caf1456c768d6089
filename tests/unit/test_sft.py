"""SFT batches: the loss is over the completion tokens only."""

from __future__ import annotations

import pytest
import torch

from eagrl.llm.sft import sft_batch, targets_over_limit
from eagrl.models.backbone import BackboneOptions, tiny_random_llama


def test_prompt_and_padding_are_masked(tokenizer):
    prompts = ["<|im_start|>user\nA long prompt about a patient.<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nShort.<|im_end|>\n"]
    completions = ["<Final Answer> 0.7", "<Subquestion> Why?\n<Answer> Because."]
    batch = sft_batch(tokenizer, prompts, completions)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = batch["labels"][b]
        assert (labels[:n_prompt] == -100).all()
        assert labels[n_prompt : n_prompt + len(target)].tolist() == target
        assert (labels[n_prompt + len(target) :] == -100).all()
        assert batch["attention_mask"][b].sum() == n_prompt + len(target)


def test_the_loss_ignores_prompt_tokens(tokenizer):
    torch.manual_seed(0)
    model = tiny_random_llama(tokenizer)
    prompt = "<|im_start|>user\nThe patient is aged 70.<|im_end|>\n<|im_start|>assistant\n"
    batch = sft_batch(tokenizer, [prompt], ["<Final Answer> 0.4"])
    loss = model(**batch).loss
    # by hand: next-token cross-entropy over the completion positions only
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1]
    targets = batch["input_ids"][0, 1:]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert loss.item() == pytest.approx(per_token[n_prompt - 1 :].mean().item(), rel=1e-5)
    assert abs(loss.item() - per_token.mean().item()) > 1e-4  # fails if prompt tokens counted
    # changing the prompt's tokens changes nothing the loss learns from, only the context
    assert (batch["labels"][0, :n_prompt] == -100).all()


def test_max_length_cuts_the_completion_not_the_prompt(tokenizer):
    prompt = "<|im_start|>user\nSome prompt text here.<|im_end|>\n"
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    batch = sft_batch(tokenizer, [prompt], ["word " * 50], max_length=n_prompt + 5)
    assert batch["input_ids"].shape[1] == n_prompt + 5
    assert (batch["labels"][0, n_prompt:] != -100).sum() == 5


def test_completion_loss_equals_the_models_own_loss(tokenizer):
    from lightning_modules.sft import completion_loss

    torch.manual_seed(0)
    model = tiny_random_llama(tokenizer)
    batch = sft_batch(tokenizer, ["<|im_start|>user\nA prompt.<|im_end|>\n", "<|im_start|>user\nA longer prompt here.<|im_end|>\n"], ["<Final Answer> 0.4", "x"])
    assert completion_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_the_adapter_export_from_a_gathered_state_dict_equals_peft_own(tmp_path):
    """Under FSDP the adapter is written from the gathered state dict (``_save_adapter``): the same files
    as peft's ``save_pretrained``, which cannot see the sharded weights."""
    from safetensors.torch import load_file

    from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
    from lightning_modules.adapters import _save_adapter

    torch.manual_seed(0)
    llm, _ = load_backbone(BackboneOptions(name="tiny-random-llama", lora=LoraOptions(rank=4, alpha=8, dropout=0.0)))
    for name, p in llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # B starts at zero: make the two exports distinguishable from zeros
    (tmp_path / "peft").mkdir()
    (tmp_path / "ours").mkdir()
    llm.save_pretrained(tmp_path / "peft")
    _save_adapter(llm, {f"llm.{k}": v for k, v in llm.state_dict().items()}, tmp_path / "ours")
    want, got = load_file(tmp_path / "peft/adapter_model.safetensors"), load_file(tmp_path / "ours/adapter_model.safetensors")
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert (tmp_path / "ours/adapter_config.json").is_file()


def test_checkpoint_names_under_fsdp_match_the_full_state_dict():
    from lightning_modules.adapters import _clean

    wrapped = "llm._fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.lora_A.default.weight"
    assert _clean(wrapped) == "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def test_targets_over_limit_counts_the_trained_tokens(tokenizer):
    completions = ["<Final Answer> 0.7", "<Subquestion> Why is the lactate high?\n<Answer> Because of shock.\n<Final Answer> 0.9"]
    lengths = sorted(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in completions)  # + end of turn
    assert targets_over_limit(tokenizer, completions, lengths[1]) == {"targets": 2, "over": 0, "median": lengths[1], "longest": lengths[1]}
    assert targets_over_limit(tokenizer, completions, lengths[1] - 1)["over"] == 1
    assert targets_over_limit(tokenizer, completions, lengths[0] - 1)["over"] == 2
    assert targets_over_limit(tokenizer, [], 5) == {"targets": 0, "over": 0, "median": 0, "longest": 0}
