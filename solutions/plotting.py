"""Matplotlib with Japanese labels (imported by ``solutions``).

``matplotlib_fontja`` registers a Japanese font (IPAex Gothic) and makes it the default,
so titles and axis labels in Japanese render without missing-glyph boxes.
"""

import os
import warnings

import matplotlib
import matplotlib_fontja  # noqa: F401  (sets the Japanese font on import)

# In the tests (smoke profile) a character missing from the font fails the cell instead of
# silently drawing an empty box.
if os.environ.get("BOOK_PROFILE", "").strip().lower() == "smoke":
    warnings.filterwarnings("error", message=r"Glyph .* missing from font")

# The Japanese font has no U+2212 MINUS SIGN; use the ASCII hyphen on axes.
matplotlib.rcParams["axes.unicode_minus"] = False
matplotlib.rcParams["figure.dpi"] = 100
