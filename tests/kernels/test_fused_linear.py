"""The fused linear GRPO loss (``eagrl.kernels.fused_linear``) against the unfused path (logits, reference op,
``clipped_surrogate``) in fp64 on tiny shapes: loss, log-prob, entropy, clip fractions and the gradients of the
hidden states and of a trained output layer; chunk sizes 1, odd and N; padding rows; both clips acting; the KL
term; the Triton chunks under TRITON_INTERPRET=1; torch.compile(fullgraph=True) with no graph break."""

from __future__ import annotations

import pytest
import torch

from eagrl.errors import EAGRLInputError
from eagrl.kernels import triton_runs_on
from eagrl.kernels.fused_linear import STATS, fused_linear_policy_loss, output_layer, unfused_policy_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here (no CUDA, TRITON_INTERPRET unset)")
N, D, V = 13, 8, 37  # V is a multiple of no chunk or block


def _case(dtype=torch.float64, kl: bool = True, train_weight: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    ids = torch.randint(0, V, (N,), generator=g)
    logp_now = torch.log_softmax((hidden @ weight.t()) / 0.8, -1)[torch.arange(N), ids]
    old = logp_now + torch.randn(N, generator=g, dtype=torch.float64) * 0.5  # ratios spread on both sides of the clips
    advantages = torch.randn(N, generator=g, dtype=torch.float64)
    weights = torch.full((N,), 1.0 / (N - 3), dtype=torch.float64)
    weights[-3:] = 0.0  # padding rows
    eps_high = 0.2 + 0.2 * torch.rand(N, generator=g, dtype=torch.float64)  # ε(τ) per token
    ref = logp_now + torch.randn(N, generator=g, dtype=torch.float64) * 0.3
    cast = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return {
        "hidden": cast(hidden).requires_grad_(), "weight": cast(weight).requires_grad_(train_weight), "ids": ids.to(DEVICE),
        "old_logp": cast(old), "advantages": cast(advantages), "agg_weights": cast(weights), "eps_high": cast(eps_high),
        "ref_logp": cast(ref) if kl else None, "eps_low": 0.2, "kl_coef": 0.1 if kl else 0.0, "temperature": 0.8,
    }  # fmt: skip


def _run(fn, case: dict, **extra):
    hidden = case["hidden"].detach().clone().requires_grad_()
    weight = case["weight"].detach().clone().requires_grad_(case["weight"].requires_grad)
    args = {**case, "hidden": hidden, "weight": weight}
    loss, logp, entropy, stats = fn(**args, **extra)
    loss.backward()
    return loss.detach(), logp, entropy, stats, hidden.grad, weight.grad


def _assert_same(fused, unfused, tol: float) -> None:
    loss, logp, entropy, stats, grad_h, grad_w = fused
    loss_u, logp_u, entropy_u, stats_u, grad_h_u, grad_w_u = unfused
    torch.testing.assert_close(loss, loss_u.to(loss.dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(logp, logp_u.to(logp.dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(entropy, entropy_u.to(entropy.dtype), atol=tol, rtol=tol)
    for name in STATS:
        assert float(stats[name]) == pytest.approx(float(stats_u[name].detach()), abs=max(tol, 1e-6)), name  # clipped_surrogate counts in fp32
    torch.testing.assert_close(grad_h, grad_h_u, atol=tol, rtol=tol)
    if grad_w_u is None:
        assert grad_w is None
    else:
        torch.testing.assert_close(grad_w, grad_w_u, atol=tol, rtol=tol)


@pytest.mark.parametrize("chunk", [1, 5, N])
@pytest.mark.parametrize("kl", [True, False])
def test_the_torch_chunks_equal_the_unfused_path_in_fp64(chunk, kl):
    case = _case(kl=kl)
    unfused = _run(unfused_policy_loss, case)
    assert 0 < float(unfused[3]["clip_high"]) and 0 < float(unfused[3]["clip_low"])  # both clips act in this case
    _assert_same(_run(fused_linear_policy_loss, case, path="torch", chunk_size=chunk), unfused, 1e-10)


def test_a_frozen_output_layer_gets_no_gradient_and_old_logp_none_is_this_forward():
    case = {**_case(train_weight=False), "old_logp": None}
    fused = _run(fused_linear_policy_loss, case, path="torch", chunk_size=4)
    unfused = _run(unfused_policy_loss, case)
    _assert_same(fused, unfused, 1e-10)
    assert fused[5] is None and float(fused[3]["ratio"]) == pytest.approx(1.0)


def test_padding_rows_carry_no_gradient():
    case = _case()
    grad_h = _run(fused_linear_policy_loss, case, path="torch", chunk_size=4)[4]
    assert torch.all(grad_h[-3:] == 0) and torch.any(grad_h[:-3] != 0)


def test_the_upstream_gradient_scales_the_stored_one():
    case = _case()
    hidden = case["hidden"].detach().clone().requires_grad_()
    (3.0 * fused_linear_policy_loss(**{**case, "hidden": hidden, "weight": case["weight"].detach()}, path="torch")[0]).backward()
    once = _run(fused_linear_policy_loss, {**case, "weight": case["weight"].detach()}, path="torch")[4]
    torch.testing.assert_close(hidden.grad, 3.0 * once)


@needs_kernels
@pytest.mark.parametrize("chunk", [1, 6, N])
def test_the_triton_chunks_equal_the_unfused_path(chunk):
    case = _case(dtype=torch.float32)
    unfused = _run(unfused_policy_loss, _case(dtype=torch.float64))
    fused = _run(fused_linear_policy_loss, case, path="triton", chunk_size=chunk)
    _assert_same(tuple(t if not isinstance(t, torch.Tensor) else t.double() for t in fused[:3]) + (fused[3],) + tuple(t.double() for t in fused[4:]), unfused, 2e-5)


@needs_kernels
@pytest.mark.slow
def test_the_fused_linear_loss_compiles_fullgraph_with_no_graph_break():
    import torch._dynamo

    case = _case(dtype=torch.float32)
    args = dict(case, path="triton", chunk_size=4)
    explained = torch._dynamo.explain(fused_linear_policy_loss)(**args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = _run(torch.compile(fused_linear_policy_loss, fullgraph=True, dynamic=True), case, path="triton", chunk_size=4)
    _assert_same(compiled, _run(fused_linear_policy_loss, case, path="triton", chunk_size=4), 1e-6)


def test_the_op_registration_passes_opcheck():
    case = _case(dtype=torch.float32, train_weight=True)
    from eagrl.kernels.fused_linear import _fused_linear

    args = (case["hidden"], case["weight"], case["ids"], case["old_logp"], case["advantages"], case["agg_weights"], case["eps_high"],
            case["ref_logp"], 0.2, 0.1, 0.8, 4, False, False, True, True)  # fmt: skip
    torch.library.opcheck(_fused_linear, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_output_layers_it_cannot_fuse_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    weight, scale = output_layer(model)
    assert weight is model.lm_head.weight and scale == 1.0
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(EAGRLInputError, match="soft-caps its logits"):
        output_layer(model)
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Linear(8, 32, bias=True)
    with pytest.raises(EAGRLInputError, match="output layer has a bias"):
        output_layer(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_fused_linear_loss_on_gpu_at_qwen_vocabulary(dtype):
    n, d, vocab = 96, 64, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g)
    weight = torch.randn(vocab, d, device="cuda", generator=g) / d**0.5
    ids = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    case = {"ids": ids, "old_logp": -torch.rand(n, device="cuda", generator=g) * 3 - 10, "advantages": torch.randn(n, device="cuda", generator=g),
            "agg_weights": torch.full((n,), 1.0 / n, device="cuda"), "eps_high": torch.full((n,), 0.3, device="cuda"), "ref_logp": None,
            "eps_low": 0.2, "kl_coef": 0.0, "temperature": 1.0}  # fmt: skip
    exact = _run(unfused_policy_loss, {**case, "hidden": hidden.double().requires_grad_(), "weight": weight.double()})
    rounded = {**case, "hidden": hidden.to(dtype).requires_grad_(), "weight": weight.to(dtype)}
    fused = _run(fused_linear_policy_loss, rounded, path="triton", chunk_size=32)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused[1].double(), exact[1], atol=tol * 10, rtol=tol)  # log-probs
    torch.testing.assert_close(fused[4].double(), exact[4], atol=tol, rtol=tol * 10)  # dL/dh
