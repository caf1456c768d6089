"""Time and peak extra memory of the per-token log-prob + entropy over N tokens x V vocabulary, forward
and forward + backward, three ways:

  (a) eager PyTorch: ``log_softmax`` of the fp32 logits, gather, ``-(p * logp).sum``;
  (b) ``torch.compile`` of the pure-PyTorch reference (``eagrl.kernels.reference``);
  (c) the fused Triton kernels (``eagrl.kernels``; a GPU, or ``--interpret`` on a CPU: slow, tiny sizes only).

    python benchmarks/kernel.py                                   # CPU: (a) and (b)
    python benchmarks/kernel.py --tokens 8192 32768 --vocab 151936 --dtype bfloat16   # GPU: all three + GB/s
    python benchmarks/kernel.py --linear --tokens 4096 --vocab 49152 --hidden 576     # the fused linear GRPO loss

``--linear`` measures the RL loss from the final hidden states h [N, D] and a frozen output layer W [V, D], forward +
backward, three ways: ``today`` (logits = h Wᵀ, the fused log-prob/entropy op of the resolved backend, the clipped
surrogate: ``eagrl.rl.grpo.policy_loss``), ``fused_linear`` (``eagrl.kernels.fused_linear``: chunks of rows, the
gradient of h computed in the forward) and ``matmul`` (h Wᵀ and g W alone: the floor both paths pay).

"Peak extra memory" is the peak allocation above the inputs (logits, ids, upstream gradients): CUDA's
``max_memory_allocated`` on a GPU, the growth of peak RSS (``VmHWM``, reset per measurement) on a CPU. The
forward's achieved bandwidth counts one read of the logits (N·V·bytes) over the forward time; the backward's, one
read of the logits and one write of their gradient (2·N·V·bytes) over the backward time (forward + backward
minus forward); both against the
device's memory bandwidth (``--bandwidth-gbs``, default: measured by a device-to-device copy of 1 GiB). Results go to
``results/bench_kernel.json``; times are medians over ``--repeats`` after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))



def measured_bandwidth_gbs() -> float | None:
    """The GPU's memory bandwidth from a device-to-device copy of 1 GiB (bytes read + written over the median
    time of 5 copies): the roofline the kernels are compared with. None on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(times) / 1e9


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak extra bytes over a block: CUDA allocator peak, or VmHWM growth on a CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current RSS
            self.base = _rss_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_kib("VmHWM:") * 1024 - self.base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="N, rows of logits")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152], help="V (SmolLM2 49152, Qwen2.5 151936)")
    parser.add_argument("--dtype", default=None, help="logits dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--interpret", action="store_true", help="also run (c) on a CPU under TRITON_INTERPRET=1 (very slow)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="device memory bandwidth in GB/s (default: measured)")
    parser.add_argument("--linear", action="store_true", help="benchmark the fused linear GRPO loss against today's path")
    parser.add_argument("--hidden", type=int, default=576, help="--linear: D, the hidden size (SmolLM2 576, Qwen2.5-7B 3584)")
    parser.add_argument("--chunk", type=int, default=None, help="--linear: rows per chunk (default: eagrl.kernels.fused_linear.default_chunk)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/bench_kernel.json (--linear: results/bench_fused_linear.json)")
    args = parser.parse_args()
    args.out = args.out or REPO / "results" / ("bench_fused_linear.json" if args.linear else "bench_kernel.json")
    if args.linear:
        return linear(args)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    from eagrl.io import write_json_atomic
    from eagrl.kernels import token_logp_entropy, token_logp_entropy_reference, triton_runs_on

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth = args.bandwidth_gbs or measured_bandwidth_gbs()
    temperature = 1.0

    def eager(z, ids):
        logp_all = torch.log_softmax(z.float() / temperature, dim=-1)  # [N, V]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, ids[:, None]).squeeze(-1), entropy

    compiled_reference = torch.compile(lambda z, ids: token_logp_entropy_reference(z, ids, temperature)[:2], dynamic=False)
    paths = {"eager": eager, "compiled_reference": compiled_reference}
    if triton_runs_on(device):
        paths["fused_kernel"] = lambda z, ids: token_logp_entropy(z, ids, temperature, backend="triton")[:2]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, backward: bool, z, ids, g1, g2) -> tuple[float, int]:
        times, peaks = [], []
        for k in range(args.repeats + 1):
            leaf = z.detach().requires_grad_(backward)
            sync()
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                logp, entropy = fn(leaf, ids)
                if backward:
                    torch.autograd.backward([logp, entropy], [g1, g2])
                sync()
                elapsed = time.perf_counter() - start
            del logp, entropy, leaf
            if k:  # the first run warms up (and compiles)
                times.append(elapsed)
                peaks.append(memory.peak)
        return statistics.median(times), max(peaks)

    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            generator = torch.Generator(device=device).manual_seed(0)
            z = (torch.randn(tokens, vocab, device=device, generator=generator) * 3).to(dtype)
            ids = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
            g1, g2 = torch.randn(tokens, device=device), torch.randn(tokens, device=device)
            logits_bytes = z.numel() * z.element_size()
            for label, fn in paths.items():
                if label == "fused_kernel" and device == "cpu" and tokens * vocab > 2_000_000:
                    continue  # the interpreter runs a few million elements per second at best
                forward_s, forward_peak = timed(fn, False, z, ids, g1, g2)
                both_s, both_peak = timed(fn, True, z, ids, g1, g2)
                row = {
                    "path": label, "tokens": tokens, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
                    "forward_ms": forward_s * 1e3, "forward_backward_ms": both_s * 1e3,
                    "forward_peak_extra_mib": forward_peak / 2**20, "forward_backward_peak_extra_mib": both_peak / 2**20,
                    "logits_mib": logits_bytes / 2**20, "forward_gbs": logits_bytes / forward_s / 1e9,
                }  # fmt: skip
                backward_s = max(both_s - forward_s, 1e-9)  # the backward reads the logits once and writes their gradient
                row["backward_gbs"] = 2 * logits_bytes / backward_s / 1e9
                if bandwidth:
                    row["forward_bandwidth_fraction"] = row["forward_gbs"] / bandwidth
                    row["backward_bandwidth_fraction"] = row["backward_gbs"] / bandwidth
                rows.append(row)
                print(
                    f"{label:>18}  N={tokens:<6} V={vocab:<7} {row['dtype']:>8}  fwd {row['forward_ms']:9.2f} ms "
                    f"({row['forward_gbs']:7.1f} GB/s)  fwd+bwd {row['forward_backward_ms']:9.2f} ms  "
                    f"peak extra fwd {row['forward_peak_extra_mib']:8.1f} MiB  fwd+bwd {row['forward_backward_peak_extra_mib']:8.1f} MiB",
                    flush=True,
                )
            del z
    summary = {"device": name, "bandwidth_gbs": bandwidth, "torch": torch.__version__, "threads": args.threads, "rows": rows}
    for vocab in args.vocab:
        for tokens in args.tokens:
            by = {r["path"]: r for r in rows if r["tokens"] == tokens and r["vocab"] == vocab}
            if "fused_kernel" in by and "eager" in by:
                fused, eager_row = by["fused_kernel"], by["eager"]
                ratio = eager_row["forward_peak_extra_mib"] / max(fused["forward_peak_extra_mib"], 1e-6)
                print(f"N={tokens} V={vocab}: fused forward uses {ratio:.0f}x less peak extra memory than eager, "
                      f"{fused['forward_ms']:.2f} vs {eager_row['forward_ms']:.2f} ms")  # fmt: skip
    write_json_atomic(args.out, summary)
    print(f"wrote {args.out}")


def linear(args) -> None:
    """The fused linear GRPO loss against today's path and a bare matmul (see the module docstring)."""
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from eagrl.io import write_json_atomic
    from eagrl.kernels import resolve_backend
    from eagrl.kernels.fused_linear import default_chunk, fused_linear_policy_loss
    from eagrl.rl.grpo import policy_loss

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    path = resolve_backend("auto", device)
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            gen = torch.Generator(device=device).manual_seed(0)
            hidden = torch.randn(tokens, args.hidden, device=device, generator=gen).to(dtype)
            weight = (torch.randn(vocab, args.hidden, device=device, generator=gen) / args.hidden**0.5).to(dtype)  # frozen (LoRA)
            ids = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
            old = -torch.rand(tokens, device=device, generator=gen) * 5 - 8
            advantages = torch.randn(tokens, device=device, generator=gen)
            weights = torch.full((tokens,), 1.0 / tokens, device=device)
            eps = torch.full((tokens,), 0.3, device=device)
            chunk = args.chunk or default_chunk(vocab)

            def today(h):
                return policy_loss(h @ weight.t(), ids, old, advantages, weights, eps, None, 0.2, 0.0, 1.0, path)[0]

            def fused(h):
                return fused_linear_policy_loss(h, weight, ids, old, advantages, weights, eps, None, 0.2, 0.0, 1.0, path, chunk)[0]

            def matmul(h):
                return (h @ weight.t()).float().mean()  # backward: one [N, V] x [V, D] product, as both paths

            for label, fn in (("matmul", matmul), ("today", today), ("fused_linear", fused)):
                times, peaks = [], []
                for k in range(args.repeats + 1):
                    leaf = hidden.detach().requires_grad_()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    with PeakMemory(device) as memory:
                        start = time.perf_counter()
                        fn(leaf).backward()
                        if device == "cuda":
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - start
                    del leaf
                    if k:
                        times.append(elapsed)
                        peaks.append(memory.peak)
                row = {"path": label, "kernel_path": path, "tokens": tokens, "vocab": vocab, "hidden": args.hidden, "chunk": chunk,
                       "dtype": str(dtype).replace("torch.", ""), "forward_backward_ms": statistics.median(times) * 1e3,
                       "peak_extra_mib": max(peaks) / 2**20}  # fmt: skip
                rows.append(row)
                print(f"{label:>13}  N={tokens:<6} V={vocab:<7} D={args.hidden:<5} {row['dtype']:>8}  fwd+bwd {row['forward_backward_ms']:9.1f} ms  "
                      f"peak extra {row['peak_extra_mib']:8.1f} MiB", flush=True)  # fmt: skip
            by = {r["path"]: r for r in rows if r["tokens"] == tokens and r["vocab"] == vocab}
            time_ratio = by["fused_linear"]["forward_backward_ms"] / by["today"]["forward_backward_ms"]
            memory_ratio = by["fused_linear"]["peak_extra_mib"] / max(by["today"]["peak_extra_mib"], 1e-6)
            print(f"N={tokens} V={vocab}: fused linear / today: time {time_ratio:.2f}x (target <= 1.2), "
                  f"peak extra memory {memory_ratio:.3f}x (target <= 0.125)", flush=True)  # fmt: skip
            by["fused_linear"].update(time_vs_today=time_ratio, memory_vs_today=memory_ratio)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    write_json_atomic(args.out, {"device": name, "torch": torch.__version__, "threads": args.threads, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
