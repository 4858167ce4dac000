"""``python -m fastloss``: the same as the ``fastloss`` command."""

import sys

from .cli import main

sys.exit(main())
