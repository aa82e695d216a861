"""Build ``loraforge/tiny-llama`` offline and deterministically.

A Llama-architecture model with random weights (205k parameters) and a byte-level BPE tokenizer
trained here on generated text, carrying the Llama 3 special tokens and chat template. It exists so
the whole pipeline (train, register, serve) runs on a CPU in seconds with nothing downloaded.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]
VOCAB_SIZE = 1024
TINY_BOS, TINY_EOS, TINY_PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
# A frozen random lm_head with the default std (0.02) caps the loss LoRA can reach at ~5.7;
# std 1.0 lets the adapter drive it to ~0 (measured, FACTS_CPU §3).
LM_HEAD_STD = 1.0
SEED = 1234

_WORDS = (
    "the a an my your our order ticket refund shipping label priority high low medium ok true false "
    "please classify this customer message has not arrived yet answer reply with json only you are "
    "assistant user system helpful classifier score positive negative neutral question what is how "
    "when where why can could would should account password reset invoice payment card bank delivery "
    "package late broken damaged return exchange hello thanks thank help need want status update name "
    "email phone address city country yes no maybe error warning info debug value key list item"
).split()


def _corpus(n_lines: int = 4000) -> list[str]:
    rng = random.Random(SEED)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if i % 3 == 0:
            k1, k2, k3 = rng.sample(_WORDS, 3)
            value, number, score = rng.choice(_WORDS), rng.randint(0, 999), rng.random()
            lines.append(f'{{"{k1}": "{value}", "{k2}": {number}, "{k3}": {score:.2f}}}')
        lines.append(
            " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]) + f" {rng.randint(0, 9999)}"
        )
    return lines


def build_raw_tokenizer():  # type: ignore[no-untyped-def]
    """Train the tiny model's byte-level BPE tokenizer (``tokenizers`` only: no torch, no transformers).

    Deterministic: the same corpus and settings give the same ``tokenizer.json`` as the full build
    (:func:`build_tiny_llama` wraps this very object), so the API and the worker can count tokens
    with it without importing torch.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return tok


def save_tokenizer_json(output_dir: Path) -> Path:
    """Write the tiny tokenizer's ``tokenizer.json`` into ``output_dir`` (atomically; idempotent).

    Args:
        output_dir: directory to hold ``tokenizer.json``; created if missing.

    Returns:
        The path of ``tokenizer.json``.
    """
    path = output_dir / "tokenizer.json"
    if path.is_file():
        return path
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".tokenizer-{os.getpid()}-{random.randrange(1 << 30)}.json"
    try:
        build_raw_tokenizer().save(str(tmp))
        # Same bytes whoever wins the race (deterministic build), so a plain replace is safe.
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _build_tokenizer(chat_template: str):  # type: ignore[no-untyped-def]
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(),
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
    )
    fast.chat_template = chat_template
    return fast


def build_tiny_llama(output_dir: Path, chat_template: str) -> Path:
    """Write the tiny model and its tokenizer to ``output_dir`` (atomically; idempotent).

    Args:
        output_dir: final directory; left untouched if it already holds a built model.
        chat_template: Jinja chat template stored with the tokenizer.

    Returns:
        ``output_dir``.
    """
    if (output_dir / "config.json").is_file():
        return output_dir
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = _build_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(mean=0.0, std=LM_HEAD_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[
            tokenizer.convert_tokens_to_ids("<|eot_id|>"),
            tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
        ],
        pad_token_id=tokenizer.pad_token_id,
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(output_dir)
        except OSError:
            # Another process finished first; its copy is identical (deterministic build).
            if not (output_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
