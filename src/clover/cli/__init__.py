"""The ``clover`` command: thin subcommands over the library's verbs, tables on screen, JSON on request.

One module per verb (parse, call the verb, print the report); what they share sits in ``common`` (console,
options, checks before loading) and ``report`` (before / after payloads and the summary). Every user-facing failure
is a ``CloverError`` and ends as one line on stderr with exit code 2.
"""

from __future__ import annotations

import typer

from . import evaluate, export, finetune, heal, inspect, latent, mla, orthogonalize, prune, slice, sweep
from .common import fails_cleanly

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CLOVER: cross-layer orthogonal vectors for transformer attention.")

app.command()(fails_cleanly(inspect.inspect))
app.command()(fails_cleanly(orthogonalize.orthogonalize))
app.command(name="eval")(fails_cleanly(evaluate.evaluate))
app.command()(fails_cleanly(prune.prune))
app.command()(fails_cleanly(latent.latent))
app.command(name="slice")(fails_cleanly(slice.slice_command))
app.command()(fails_cleanly(mla.mla))
app.command()(fails_cleanly(export.export))
app.command()(fails_cleanly(sweep.sweep))
app.command()(fails_cleanly(finetune.finetune))
app.command()(fails_cleanly(heal.heal))


def main() -> None:  # pragma: no cover - console entry point alias
    app()
