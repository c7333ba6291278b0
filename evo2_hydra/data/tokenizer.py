"""savanna's CharLevelTokenizer (savanna `savanna/tokenizer/tokenizer.py`): one token per UTF-8
byte, EOD = 0, PAD = 1.

Every token fits in a byte, so the preprocessing pipeline works on uint8 buffers and widens to the
on-disk uint16 only when writing.
"""

from __future__ import annotations

import numpy as np

NAME = "CharLevelTokenizer"
VOCAB_SIZE = 512
EOD = 0  # end of document, appended after each document with data.append_eod
PAD = 1  # right padding in padded packing
DISK_DTYPE = np.dtype("<u2")  # savanna writes uint16 because vocab_size < 65500

# Token ids with special meaning in the loss (savanna `training.py` `_get_batch_ar`).
LOWER_A, LOWER_Z = ord("a"), ord("z")
CASE_OFFSET = ord("a") - ord("A")


def tokenize(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as uint8 token ids (what `np.fromstring(text, uint8)` gave savanna)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def detokenize(ids) -> str:
    """savanna's detokenize: each id becomes chr(clamp(id, 32, 512))."""
    return "".join(chr(max(32, min(int(i), VOCAB_SIZE))) for i in ids)
