"""One base class for errors a user can act on; the CLI prints them as one line, no traceback."""

import difflib


class ClipInspectError(Exception):
    """Raised for bad input or state; the message names the value and what to do."""


class UsageError(ClipInspectError, ValueError):
    """An argument value that cannot work (a batch size of 0, an unknown mode, ...)."""


# How alike (difflib's ratio: twice the matching characters over both lengths) a misspelling must
# be to a choice for the hint to name it. 0.8 takes one wrong, missing or extra letter in a name
# of five letters or more ('weeve' for 'weave' is 0.8, 'washr' for 'washer' 0.91) and leaves out
# one letter changed in a name of four ('pcb5' and 'pcb1', 'wood' and 'good', 'int4' and 'int8'
# are 0.75): in names that short one letter more likely makes another real name than a typo.
CLOSE_MATCH_CUTOFF = 0.8


def did_you_mean(value: str, choices) -> str:
    """" (did you mean 'x'?)" for the choice ``value`` most likely meant, else ''. A choice that
    differs only in case (``Weave`` for ``weave``) comes first; else the closest close
    misspelling (case aside) at ``CLOSE_MATCH_CUTOFF`` or above; nothing close: ''."""
    choices = [str(c) for c in choices]
    text = str(value)
    folded = [c for c in choices if c.casefold() == text.casefold() and c != text]
    if folded:
        return f" (did you mean {folded[0]!r}?)"
    by_folded = {c.casefold(): c for c in reversed(choices) if c != text}
    close = difflib.get_close_matches(text.casefold(), list(by_folded), n=1,
                                      cutoff=CLOSE_MATCH_CUTOFF)
    return f" (did you mean {by_folded[close[0]]!r}?)" if close else ""
