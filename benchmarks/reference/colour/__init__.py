"""The colour reference model: a class-conditional pixel-space DiT on 32x32 RGB emoji.

The images are the Noto Color Emoji font's bitmaps (Debian ``fonts-noto-color-emoji``, SIL OFL
1.1), labelled with their Unicode emoji group from ``emoji-test.txt`` (Debian ``unicode-data``).
See README.md in this folder for the data card and the model.
"""
