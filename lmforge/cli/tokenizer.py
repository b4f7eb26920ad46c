"""``lmforge tokenizer train``: a byte-level BPE tokenizer from your own text files
(``training/bpe.py``), in this process::

    lmforge tokenizer train corpus/*.txt --out my-tokenizer --vocab-size 8192

The directory it writes loads with ``transformers.AutoTokenizer.from_pretrained`` and is what
``lmforge pretrain --tokenizer`` takes.
"""

from __future__ import annotations

from pathlib import Path

import click

from lmforge.errors import LMForgeError


@click.group()
def tokenizer() -> None:
    """Train tokenizers on your own text."""


@tokenizer.command("train")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The directory to write tokenizer.json and tokenizer_config.json to.")
@click.option("--vocab-size", type=int, default=8192, show_default=True,
              help="Vocabulary size, the 256 byte symbols and the special tokens included.")
@click.option("--min-frequency", type=int, default=2, show_default=True,
              help="A pair becomes a merge only if it occurs this often.")
@click.option("--special-token", "special_tokens", multiple=True, default=("<|endoftext|>",),
              show_default=True, help="Repeatable; the first is the bos/eos/unk token.")
def train(files: tuple[Path, ...], out_dir: Path, vocab_size: int, min_frequency: int,
          special_tokens: tuple[str, ...]) -> None:
    """Train a byte-level BPE tokenizer (GPT-2's kind) on FILES (UTF-8 text): any text then
    encodes without unknown tokens and decodes back byte for byte."""
    # imported here: transformers loads only when a tokenizer is trained
    from lmforge.training.bpe import train_bpe_tokenizer

    try:
        trained = train_bpe_tokenizer(files, out_dir, vocab_size=vocab_size,
                                      min_frequency=min_frequency, special_tokens=special_tokens)
    except LMForgeError as e:
        raise click.UsageError(e.message) from e
    size = sum(f.stat().st_size for f in files)
    click.echo(f"trained a {len(trained)}-token byte-level BPE vocabulary on {len(files)} "
               f"file(s), {size / 1e6:.1f} MB; wrote {out_dir}")
