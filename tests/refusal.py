"""``refused(ExceptionType, message)``: expect exactly this refusal.

``pytest.raises(T, match="part")`` searches: a message reworded around the
part, or naming the wrong host, still passes. Security refusals are part of
the behaviour (operators and audits read them), so their tests pin the whole
text; mutation testing (tools/mutation.sh) found the difference.
"""

import re
from typing import Any

import pytest


def refused(expected: type[BaseException], message: str) -> Any:
    """A ``pytest.raises`` that also requires ``str(error) == message``."""
    return pytest.raises(expected, match="^%s$" % re.escape(message))
