"""A tiny random-weight Llama with a locally trained tokenizer, for tests and the demo.

There is no model hub here, so the model is made: same bytes for the same
arguments (seeded weights, a tokenizer trained on a fixed synthetic corpus),
cached on disk under ``$VLLM_BIDKV_CACHE`` (default ``~/.cache/vllm-bidkv``).
Greedy decoding of it is deterministic, which is the oracle for "outputs equal
with and without the connector". head_dim 64: the CPU attention backend rejects 16.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

_WORDS = [
    "the",
    "a",
    "kv",
    "cache",
    "block",
    "token",
    "prefix",
    "request",
    "scheduler",
    "memory",
    "offload",
    "load",
    "store",
    "swap",
    "preempt",
    "victim",
    "bid",
    "cost",
    "gpu",
    "cpu",
    "tier",
    "hash",
    "queue",
    "free",
    "pool",
    "step",
    "batch",
    "decode",
    "prefill",
    "latency",
    "throughput",
    "system",
    "prompt",
    "user",
    "assistant",
    "answer",
    "question",
    "model",
    "layer",
    "head",
    "attention",
    "value",
    "key",
    "order",
    "time",
]


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(lines)]


def tiny_model_dir(
    *,
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    sliding_window: int | None = None,
    sliding_layers: tuple[int, ...] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Path of the tiny model directory, creating it on first use.

    ``sliding_window`` with ``sliding_layers`` (layer indices; None: every layer) makes a
    model whose listed layers attend to the last ``sliding_window`` tokens only (the config's
    ``layer_types``, as Gemma 2/3 and gpt-oss mix them); the others are full attention.
    """
    spec: dict[str, object] = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
        "format": 1,
    }
    if sliding_layers is not None and sliding_window is None:
        raise ValueError(f"sliding_layers={sliding_layers!r} needs a sliding_window (tokens)")
    if sliding_window is not None:  # only set keys enter the digest: older models keep their dirs
        layers = range(num_layers) if sliding_layers is None else sliding_layers
        if not all(0 <= i < num_layers for i in layers):
            raise ValueError(f"sliding_layers={sliding_layers!r}: layers are 0..{num_layers - 1}")
        spec["sliding_window"] = sliding_window
        spec["layer_types"] = [
            "sliding_attention" if i in layers else "full_attention" for i in range(num_layers)
        ]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("VLLM_BIDKV_CACHE") or Path.home() / ".cache" / "vllm-bidkv")
    path = root / f"tiny-llama-{digest}"
    if (path / "done").exists():
        return path
    tmp = root / f".tmp-{digest}-{os.getpid()}"
    _build(tmp, spec)
    (tmp / "done").write_text("ok\n")
    with contextlib.suppress(OSError):  # another process finished first; theirs is identical
        tmp.rename(path)
    return path


BUILTIN_MODELS: dict[str, dict[str, int]] = {
    # 2 layers x 256: a step is mostly vLLM's Python; checks the mechanism, not the trade.
    "tiny": {},
    # 6 layers x 768 (39 M parameters): a prefill step here is mostly the forward (RESULTS.md
    # "Engine step profile"), so recomputing a token costs what it would on a real model.
    "llama-6x768": {"hidden_size": 768, "num_layers": 6, "num_heads": 12, "num_kv_heads": 4},
}
"""Models made here, by name (``bench engine --model NAME``); their head_dim is 64."""


def model_path(name: str) -> str:
    """A built-in model's directory (made on first use); any other name or path as given."""
    if name in BUILTIN_MODELS:
        return str(tiny_model_dir(**BUILTIN_MODELS[name]))
    return name


def _build(path: Path, spec: dict[str, Any]) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(_corpus(spec["seed"]), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)

    torch.manual_seed(spec["seed"])
    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["hidden_size"] * 2,
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    if "layer_types" in spec:  # read by vLLM's Llama: per-layer sliding window
        config.sliding_window = spec["sliding_window"]
        config.layer_types = spec["layer_types"]
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


def synthetic_prompt(rng: random.Random, num_words: int) -> str:
    """A prompt of about ``num_words`` tokens from the tokenizer's own vocabulary."""
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))
