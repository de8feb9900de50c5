"""A small random Mixtral checkpoint with a byte-level tokenizer, made without any download.

It exercises every path of the runtime (sharded safetensors, tokenizer, expert cache) in a few
megabytes. Its weights are random: the text it generates is noise, and is labelled so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from offload_rt.checkpoint import (
    INDEX_FILE,
    dense_tensor_shapes,
    expert_tensor_shapes,
    write_checkpoint,
)
from offload_rt.config import ModelConfig

DEMO_NAME = "demo-mixtral-v2"  # bump when the demo's shape changes, so old caches are not reused
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# Mixtral-Instruct's chat template: [INST] user [/INST] answer</s>, roles alternating
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)


def demo_config_dict(vocab_size: int) -> dict[str, object]:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 2048,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


def byte_level_tokenizer() -> Tokenizer:
    """Three special tokens, then one token per byte (no merges): every text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tokenizer_config() -> dict[str, object]:
    return {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }


def _random_tensors(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {**dense_tensor_shapes(cfg), **expert_tensor_shapes(cfg)}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights
            yield name, torch.ones(shape)
        else:
            yield name, torch.randn(shape, generator=gen) * 0.1


def make_demo_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint to `folder` unless it is already complete; returns `folder`."""
    if (folder / INDEX_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final place and renamed in one step: never a half-written checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        tok = byte_level_tokenizer()
        config = demo_config_dict(tok.get_vocab_size())
        cfg = ModelConfig.from_dict(config)
        write_checkpoint(tmp, config, _random_tensors(cfg, seed), max_shard_bytes=8 << 20)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
        os.replace(tmp, folder)
    except OSError:
        if (folder / INDEX_FILE).is_file():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
