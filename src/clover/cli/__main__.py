"""``python -m clover.cli`` (how ``accelerate launch`` starts a distributed fine-tune)."""

import sys

from . import app

sys.exit(app())
