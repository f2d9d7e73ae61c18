"""Constants of PaliGemma's input/output contract (docs/io-contract.md), in one place.

Token *ids* are deliberately absent: they are read from each export's tokenizer (§7).
The export format's own names live in export_format.py, the task prefixes in tasks.py.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
PROMPT_END = "\n"  # appended to every prompt (§2); not a stop token (§11)

NUM_LOC_TOKENS = 1024  # <loc0000> … <loc1023>
NUM_SEG_TOKENS = 128  # <seg000> … <seg127>
SEG_CODES_PER_OBJECT = 16
LOC_TOKENS_PER_BOX = 4  # y_min, x_min, y_max, x_max
OBJECT_SEPARATOR = " ; "


def loc_token(index: int) -> str:
    return f"<loc{index:04d}>"


def seg_token(index: int) -> str:
    return f"<seg{index:03d}>"


# Image preprocessing (§1): RGB, bicubic squash to R×R, x/255, (x − 0.5) / 0.5.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
PATCH_SIZE = 14

# Largest image accepted (PIL's own decompression-bomb threshold, ~9459²); larger ones get an ImageError.
MAX_IMAGE_PIXELS = 89_478_485

# Box de-normalisation divisor (§8): 1024 as in the HF Space parser, 1023 as in big_vision.
LOC_DIVISOR_HF = 1024
# a <loc> token's confidence: the probability of the bins within this many of it (outputs.py's box_score)
LOC_SCORE_WINDOW = 8  # 0.8 % of the image side: a box this far off is nearly the same box (IoU −5 % at 300 bins)
LOC_DIVISOR_BIG_VISION = 1023

# Generation defaults (§11).
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS_LOCALIZATION = 100  # detect / segment, as in the HF Space
DEFAULT_MAX_POSITIONS = 8192  # every released PaliGemma (exports before format v3 did not record it)

# Bundled demo / verification image (a house, a car and the sun; 320×240).
DEMO_IMAGE = "assets/demo.png"
