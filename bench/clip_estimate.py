"""Estimate how many CLIP tokens a prompt or caption uses, with the standard library only.

CLIP's text encoder reads 77 positions: a start token, up to 75 text tokens and an end token.
bench/clip_tokens.py measures this estimate against the real tokenizer (see bench/CLIP.md).
"""

from __future__ import annotations

import html
import math
import re


def estimate_clip_tokens(text: str) -> int:
    """Estimate the number of CLIP BPE tokens of text, without the start and end tokens.

    CLIP lower-cases the text and splits it into pieces: a contraction ('s, 't, 're, 've, 'm, 'll,
    'd), a run of letters, a single digit, or a run of other non-space characters (punctuation,
    underscores, symbols), then BPE-merges each piece. Here a digit or a contraction is one token. A
    run of up to 6 letters is one token (common words are); a longer one costs more with the square
    of the excess, and past 18 letters a third of a token a letter. A run of 5 or more letters costs
    more when it looks foreign: ending in a, i, o or u, or holding j, k, q, x or z (romanised names
    split into many tokens). A punctuation run of n characters costs max(1, n - 1): ")," is one
    token, "))," two. Each UTF-8 byte after the first of a non-ASCII character costs half a token
    more. The sum is raised by 1 % and rounded up, so the estimate errs towards "over budget".

    >>> estimate_clip_tokens("1girl, long_hair, looking at viewer, (masterpiece:1.2)")  # real: 18
    20
    >>> estimate_clip_tokens("")
    0
    """
    # CLIP's ftfy pass straightens curly quotes; dashes and the ellipsis are one token each anyway.
    text = html.unescape(text).lower().translate(
        {0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2013: "-", 0x2014: "-", 0x2026: "."})
    total = 0.0
    for piece in re.findall(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d|(?:[^\w\s]|_)+", text):
        extra = sum(len(char.encode()) - 1 for char in piece) / 2
        if piece[0].isalpha():
            size, excess = len(piece), max(0, len(piece) - 6)
            total += 1 + min((excess / 6) ** 2, excess / 3) + extra
            if size >= 5:
                total += (piece[-1] in "aiou") + 0.4 * sum(char in "jkqxz" for char in piece)
        elif piece[0].isdigit() or (piece[0] == "'" and piece[1:].isalpha()):
            total += 1
        else:
            total += max(1, len(piece) - 1) + extra
    return math.ceil(total * 1.01)
