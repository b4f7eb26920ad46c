"""Train a byte-level BPE tokenizer on the user's own text (``lmforge tokenizer train``).

Byte-level BPE is GPT-2's tokenizer (Radford et al. 2019, sec. 2.2; Sennrich et al. 2016 for
BPE): text is split GPT-2's way (``ByteLevel`` pre-tokenizer with its regex), every byte is
mapped to one of 256 printable base symbols, and merges are learned over those, so any UTF-8
text (emoji, Cyrillic, control characters) encodes without an unknown token and decodes back
byte for byte. Training is Hugging Face's ``tokenizers`` (Rust), as its ``ByteLevelBPETokenizer``
does; we only fix the settings that make the round trip exact: no normalizer, no prefix space,
no whitespace clean-up on decode.

The result is a directory that ``transformers.AutoTokenizer.from_pretrained`` loads
(``tokenizer.json`` and ``tokenizer_config.json``), as does
``lmforge.tokenizer.Tokenizer.from_pretrained``. Its first special token (default
``<|endoftext|>``, GPT-2's) is the bos, eos and unk token, as in GPT-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lmforge.errors import InvalidRequestError

ENDOFTEXT = "<|endoftext|>"


def train_bpe_tokenizer(files: Sequence[str | Path], out_dir: str | Path, *,
                        vocab_size: int = 8192, min_frequency: int = 2,
                        special_tokens: Sequence[str] = (ENDOFTEXT,),
                        show_progress: bool = True) -> PreTrainedTokenizerFast:
    """Learn a byte-level BPE vocabulary from ``files`` (UTF-8 text) and save it to ``out_dir``.

    Args:
        vocab_size: the vocabulary's size, special tokens and the 256 byte symbols included
            (fewer when the text has too few pairs that occur ``min_frequency`` times).
        min_frequency: a pair of symbols becomes a merge only if it occurs this often.
        special_tokens: never split, ids 0.. in this order; the first is bos/eos/unk.

    Returns:
        The trained tokenizer, as ``AutoTokenizer.from_pretrained(out_dir)`` loads it.

    Raises:
        InvalidRequestError: no files, a missing file, ``vocab_size`` too small for the byte
            alphabet plus the special tokens, ``min_frequency`` < 1, or no special token.
    """
    paths = [Path(f) for f in files]
    _check(paths, vocab_size, min_frequency, special_tokens)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=list(special_tokens), show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(p) for p in paths], trainer)
    first = special_tokens[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=first, eos_token=first,
                                   unk_token=first, clean_up_tokenization_spaces=False,
                                   model_max_length=int(1e30))
    fast.save_pretrained(str(out_dir))
    return fast


def _check(paths: list[Path], vocab_size: int, min_frequency: int,
           special_tokens: Sequence[str]) -> None:
    if not paths:
        raise InvalidRequestError("give at least one text file to train on", param="files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InvalidRequestError(f"no such file: {', '.join(missing)}", param="files")
    if not special_tokens or not all(special_tokens):
        raise InvalidRequestError("give at least one non-empty special token, e.g. "
                                  f"{ENDOFTEXT}", param="special_tokens")
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise InvalidRequestError(f"vocab_size must be at least {smallest} (the 256 byte symbols "
                                  f"and {len(special_tokens)} special tokens), got {vocab_size}",
                                  param="vocab_size")
    if min_frequency < 1:
        raise InvalidRequestError(f"min_frequency must be at least 1, got {min_frequency}",
                                  param="min_frequency")
