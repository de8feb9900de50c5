"""A small random checkpoint (Mixtral, or another family) with a byte-level tokenizer, made
without any download.

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

from offload_rt.checkpoint import INDEX_FILE, CheckpointSpec
from offload_rt.models import FAMILIES, parse_config
from offload_rt.tools.writer import write_checkpoint

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


def demo_name(family: str = "mixtral") -> str:
    """The demo checkpoint's folder name; bumped when a demo's shape changes."""
    return "demo-mixtral-v2" if family == "mixtral" else f"demo-{family}-v1"


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


def _random_tensors(spec: CheckpointSpec, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(spec.dense)
    experts = spec.experts.tensors()
    for key in spec.config.grid.keys():  # each expert's tensors in name order, as ever drawn
        for name in sorted(ref.name for ref in spec.experts.parts(key).values()):
            shapes[name] = experts[name][0]
    for name, shape in shapes.items():
        if len(shape) == 1:
            yield name, torch.ones(shape)  # norm weights (and biases)
        else:
            yield name, torch.randn(shape, generator=gen) * 0.1


def make_demo_checkpoint(folder: Path, seed: int = 0, family: str = "mixtral") -> Path:
    """Write the demo checkpoint to `folder` unless it is already complete; returns `folder`."""
    if (folder / INDEX_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final place and renamed in one step: never a half-written checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        tok = byte_level_tokenizer()
        config = FAMILIES[family].demo_config(tok.get_vocab_size())
        spec = FAMILIES[family].spec(parse_config(config), frozenset())
        write_checkpoint(tmp, config, _random_tensors(spec, seed), max_shard_bytes=8 << 20)
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
