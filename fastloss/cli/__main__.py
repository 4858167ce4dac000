"""``python -m fastloss.cli``: the same as the ``fastloss`` command."""

import sys

from . import main

sys.exit(main())
