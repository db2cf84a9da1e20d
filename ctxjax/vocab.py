"""Tiny byte-level BPE tokenizers for the CPU-sized synthetic tasks, with a ChatML chat template."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # ends every turn, so it is the EOS the sampler stops on
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant")

# ChatML, the format of Qwen-style instruct models: each message is
# `<|im_start|>{role}\n{content}<|im_end|>\n`, and the generation prompt opens an assistant turn.
# A system turn appears only when the caller passes one (`hf.render_chat` omits an empty context).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Any:
    """Trains a byte-level BPE on `texts` and wraps it as a `transformers` fast tokenizer.

    Byte-level means every string encodes and decodes losslessly, whatever it holds. Digits are
    split one per token before the byte-level step so that arithmetic tasks see `123` as `1 2 3`
    and no merge can glue digits together. Special tokens (ids 0, 1, 2): `<|pad|>`,
    `<|im_start|>`, `<|im_end|>` (the EOS); no BOS. Training is deterministic: the same texts give
    the same vocab. The chat template's role names are trained on too. The vocabulary comes out
    smaller than `vocab_size` when the texts run out of merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("build_tokenizer needs at least one text to train on")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        kind = type(texts[bad[0]]).__name__
        raise TypeError(f"build_tokenizer texts must be strings; item {bad[0]} is {kind}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Below this the 256 byte symbols and the special tokens would not fit, and bytes unseen in
    # training could not be encoded.
    minimum = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be >= {minimum} (256 bytes + special tokens), got {vocab_size}"
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,  # all 256 bytes, so any string encodes
        show_progress=False,
    )
    # Every rendered turn carries a role header; training on them (as often as chats of these
    # texts would) gives `user`, `assistant`, `system` one token each, not a spelling by letters.
    headers = [f"{role}\n" for role in CHAT_ROLES] * len(texts)
    backend.train_from_iterator(texts + headers, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        # Decoding must give back the exact text; the cleanup would rewrite " ." as ".".
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
