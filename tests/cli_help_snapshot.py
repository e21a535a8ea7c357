"""The content of ``clover --help`` and of every subcommand's help, as plain data (no terminal formatting).

    python tests/cli_help_snapshot.py > tests/data/cli_help.json   # after a deliberate change to the CLI

``test_cli_help_is_unchanged`` compares the live CLI with the stored snapshot, so a refactor of the CLI cannot
change a flag, a default or a help text without the snapshot being regenerated on purpose.
"""

from __future__ import annotations

import json

import typer.main


def help_content() -> dict:
    from clover.cli import app

    group = typer.main.get_command(app)
    commands = {}
    for name, command in group.commands.items():
        commands[name] = {
            "help": command.help,
            "params": [{"name": p.name, "opts": list(p.opts), "secondary_opts": list(p.secondary_opts),
                        "help": getattr(p, "help", None), "default": repr(p.default), "required": p.required,
                        "type": str(p.type_descriptor.annotation), "kind": p.param_type_name, "multiple": p.multiple} for p in command.params],
        }
    return {"help": group.help, "commands": commands}


if __name__ == "__main__":
    print(json.dumps(help_content(), indent=1))
