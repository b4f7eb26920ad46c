"""``lmforge pretrain``: train a GPT from scratch on your own text, in this process
(``lmforge.training.pretraining``)::

    lmforge pretrain --train corpus/*.txt --out my-gpt --max-minutes 10
    lmforge serve --model my-gpt

``--train`` and ``--valid`` take any number of files (as a shell glob gives them). Every option
can also come from ``--config run.yaml`` (the same names, dashes or underscores); the command
line wins. Running the same command again resumes the run from its newest checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from lmforge.errors import LMForgeError

GREEDY = ("--train", "--valid")  # options that take every file up to the next option


class _GreedyFiles(click.Command):
    """``--train a b c`` means ``--train a --train b --train c``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        expanded, option = [], None
        for arg in args:
            if arg in GREEDY:
                option = arg
                continue
            if option is not None and not arg.startswith("-"):
                expanded += [option, arg]
                continue
            option = None
            expanded.append(arg)
        return super().parse_args(ctx, expanded)


def _opt(name: str, type_, help_: str, **kwargs):
    return click.option(name, type=type_, default=None, help=help_, **kwargs)


@click.command(cls=_GreedyFiles)
@click.option("--train", multiple=True, help="Text files to train on (UTF-8).")
@click.option("--valid", multiple=True,
              help="Held-out text files; default: the last tenth of the training tokens.")
@_opt("--out", str, "The run's directory; the trained model ends up in it.")
@_opt("--config", click.Path(exists=True, dir_okay=False), "A YAML file of these settings.")
@_opt("--arch", click.Choice(["gpt2", "gpt1"]), "gpt2 (pre-norm; default) or gpt1 (post-norm).")
@_opt("--n-layer", int, "Transformer blocks (default 4).")
@_opt("--n-head", int, "Attention heads (default 4).")
@_opt("--n-embd", int, "Hidden size (default 128).")
@_opt("--context", int, "Context length in tokens (default 128).")
@_opt("--activation", str, "MLP activation: gelu_new (default), relu, gelu, silu.")
@_opt("--tokenizer", str, "A tokenizer directory; default: train one on --train.")
@_opt("--vocab-size", int, "Vocabulary of the tokenizer trained (default 2048).")
@_opt("--batch-size", int, "Sequences per micro-batch (default 16).")
@_opt("--gradient-accumulation-steps", int, "Micro-batches per optimizer step (default 1).")
@_opt("--learning-rate", float, "Peak AdamW learning rate (default 1e-3).")
@_opt("--warmup-steps", int, "Linear warmup steps (default 100, at most a tenth of the run).")
@_opt("--weight-decay", float, "AdamW weight decay (default 0.1).")
@_opt("--dropout", float, "Embedding and residual dropout (default 0).")
@_opt("--max-steps", int, "Stop after this many optimizer steps.")
@_opt("--max-minutes", float, "Stop after this many minutes (whichever bound comes first).")
@_opt("--eval-interval", int, "Steps between validation passes (default 100).")
@_opt("--checkpoint-interval", int, "Steps between checkpoints (default 100).")
@_opt("--seed", int, "Seed of the initialization, data order and dropout (default 0).")
@_opt("--dtype", click.Choice(["auto", "float32", "bfloat16"]),
      "Autocast: auto = bfloat16 where the hardware has it natively (default).")
@_opt("--device", str, "auto (default: cuda when available), cpu, cuda, cuda:1...")
def pretrain(config: str | None, **settings) -> None:
    """Train a GPT-2 (or GPT-1) and its BPE tokenizer from scratch on text files; the result is
    a Hugging Face model directory that `lmforge serve --model OUT` serves."""
    from lmforge.training.pretraining import pretrain as run_pretrain

    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    try:
        result = run_pretrain(config_file=config, **settings)
    except LMForgeError as e:
        raise click.UsageError(e.message) from e
    except KeyboardInterrupt:  # before the loop (tokenizing) or a second Ctrl-C in it
        click.echo("interrupted; run the same command again to continue", err=True)
        raise SystemExit(130) from None
    margin = result.unigram_entropy - result.val_loss
    click.echo(f"{'interrupted' if result.interrupted else 'trained'}: {result.steps} steps, "
               f"{result.tokens:,} tokens, {result.num_parameters / 1e6:.2f}M parameters, "
               f"{result.elapsed_s / 60:.1f} min; validation loss {result.val_loss:.3f} "
               f"(perplexity {math.exp(result.val_loss):.1f}), {margin:.3f} nats under the "
               f"unigram baseline")
    click.echo(f"wrote {Path(result.out)} (loss curve: {Path(result.out) / 'loss.png'}); serve "
               f"it with: lmforge serve --model {result.out}")
    if result.interrupted:
        click.echo("run the same command again to continue from the checkpoint")
        raise SystemExit(130)
