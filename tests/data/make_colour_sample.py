"""Write ``tests/data/emoji32_sample.npz``: the first emoji of three groups, in ``export_npz``'s
format (about 5 KB).

The committed file lets ``test_npz_round_trip_needs_no_font`` run on machines without the
Noto Color Emoji font. Regenerate (needs the font and emoji-test.txt) from the repo root with:

    PYTHONPATH=. python tests/data/make_colour_sample.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageFont

from benchmarks.reference.colour.data import (
    EMOJI_TEST_PATH,
    FONT_PATH,
    FONT_SIZE,
    _source_key,
    parse_emoji_test,
    render_glyph,
)

OUT = Path(__file__).resolve().parent / "emoji32_sample.npz"
SAMPLE_GROUPS = (0, 3, 8)  #: Smileys & Emotion, Food & Drink, Flags


def main() -> None:
    font = ImageFont.truetype(str(FONT_PATH), FONT_SIZE)
    first = {}
    for entry in parse_emoji_test(EMOJI_TEST_PATH):
        first.setdefault(entry.group, entry)
    entries = [first[g] for g in SAMPLE_GROUPS]
    np.savez_compressed(
        OUT,
        images=np.stack([render_glyph(font, e.text) for e in entries]),
        labels=np.asarray([e.group for e in entries], dtype=np.int64),
        names=np.asarray([e.name for e in entries]),
        source=np.asarray(_source_key(FONT_PATH, EMOJI_TEST_PATH)),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {[e.name for e in entries]}")


if __name__ == "__main__":
    main()
