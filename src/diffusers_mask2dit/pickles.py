"""What torch's weights-only unpickler refused, in words (shared by checkpoint loading and `convert-official`)."""

from __future__ import annotations

import re

# torch names the refused global in one of two phrasings, depending on why it refused it.
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def refusal_reason(error: BaseException) -> str:
    """Why the weights-only loader refused a file (the global it names), without torch's advice on how to load
    it anyway (which would run the file's code)."""
    found = _REFUSED_GLOBAL.search(str(error))
    if found:
        return f"it names `{found.group(1)}`, which is not a tensor type."
    return "it is not a plain tensor file."
