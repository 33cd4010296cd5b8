"""The store format and the networks whose weights it holds.

Nothing in this package may download: weights come from local files only. huggingface_hub (used by
open_clip and diffusers) reads HF_HUB_OFFLINE when it is first imported, which is after this line.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
