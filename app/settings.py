"""Service settings: one pydantic-settings class, read from `WILDPDIFF_*` environment variables (or `.env`).

Defaults are the safe ones: bind to localhost, bounded uploads, pixels, images per request and queue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_store.generator import DEFAULT_FRAME_RULE, DEFAULT_STEPS, FRAME_RULES
from model_store.inference import DEFAULT_OOD_THRESHOLD, DEFAULT_POLICY, POLICIES

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WILDPDIFF_", env_file=".env", env_ignore_empty=True, extra="ignore")

    store: Path = Field(Path("model_store/demo"), description="model store folder (verified at start)")
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    # Input limits. A request body is counted as it streams in, so a lying Content-Length does not help.
    max_upload_bytes: int = Field(32 * MiB, ge=1024, description="largest request body")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest width x height of one image")
    max_images: int = Field(64, ge=1, description="most images in one /classify request")
    max_backgrounds: int = Field(16, ge=1, description="most background frames in one request")
    # Work limits per request (app/budget.py), sized so the heaviest legal request takes under ~5 s on 2 cores
    # (`python -m bench.heavy`). Decoding dominates, ~0.7 s per 40 MP PNG however well it compresses; then
    # few-shot refinement, ~1 ms per shot and step.
    max_request_pixels: int = Field(
        64_000_000, ge=1, description="most pixels (width x height) over all images of one request"
    )
    max_steps: int = Field(100, ge=1, description="most DDIM steps a request may ask for")
    max_refine_work: int = Field(1600, ge=0, description="most shots x refine_steps in one request")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a request's model work, queue included")

    # Work limits: requests beyond `max_pending` (running + waiting) are refused with 429 + Retry-After.
    max_pending: int = Field(64, ge=1)
    retry_after_s: int = Field(1, ge=1)
    # Batching (app/batching.py): concurrent requests of one kind share a model call, up to `max_batch` of them
    # (1: every request alone); the inference thread waits up to `max_batch_wait_ms` for requests on their way.
    max_batch: int = Field(32, ge=1, description="most requests in one batched model call")
    max_batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest wait for batch mates")
    # Default: all cores but one, which is left to the event loop (multipart parsing, image decoding). On 2
    # cores `make bench` measured /adapters p50 32 ms with 1 thread against 69 ms with 2, and /classify of 16
    # frames at 8 clients 39 against 27 requests/s.
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: cores - 1)")

    adapter_cache_size: int = Field(256, ge=1, description="adapters kept for lookups by adapter_id")
    default_steps: int = Field(DEFAULT_STEPS, ge=1, le=1000, description="DDIM steps when a request names none")
    # How several background frames of one request become one condition (model_store.generator.FRAME_RULES).
    frame_rule: Literal[FRAME_RULES] = DEFAULT_FRAME_RULE
    top_k: int = Field(3, ge=1, description="labels listed per prediction")
    # X-In-Distribution: condition distance <= threshold. A threshold calibrated into the store (manifest
    # components.condition.ood_threshold) wins; this provisional one is used otherwise. Distances are in units
    # of the typical spacing of the training frames (model_store.inference.DEFAULT_OOD_THRESHOLD, as the CLI).
    ood_threshold: float = Field(DEFAULT_OOD_THRESHOLD, gt=0)
    # What to serve for a background beyond the threshold (a request's `policy` field overrides it):
    # generate anyway; fall back to the nearest seen location's mean zoo adapter (or, for a store without
    # them, the all-zero adapter = the pretrained backbone); or refuse with 422 (model_store/inference.py; the
    # CLI's --policy has the same default).
    ood_policy: Literal[POLICIES] = DEFAULT_POLICY
    # Few-shot requests (`shots` + `labels`): generated candidates scored on the shots, and the refinement cap.
    fewshot_candidates: int = Field(16, ge=1, le=256)
    max_refine_steps: int = Field(100, ge=0)
    # Zero-label requests (`frames`, unlabelled frames of the location; model_store/zerolabel.py): how many one
    # request may carry, and the bound on one adaptation (64 frames took about 1 s on 2 demo cores).
    max_frames: int = Field(256, ge=1, description="most unlabelled frames in one request")
    zerolabel_seconds: float = Field(3.0, gt=0, description="longest zero-label adaptation")

    # API keys (app/auth.py): when any is set, every route but /healthz and /readyz needs
    # `Authorization: Bearer <key>`. Comma-separated here, or one per line in a file; both may be given.
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    # SIGTERM (`wildpdiff serve`, app/drain.py): refuse new requests, let the running ones finish for this long.
    drain_grace_s: float = Field(20.0, ge=0)

    @model_validator(mode="after")
    def _default_steps_within_limit(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) is above max_steps ({self.max_steps})")
        return self

    def intra_op_threads(self) -> int:
        """`torch_threads`, or all cores of this process but one (at least 1)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.torch_threads or max(1, cores - 1)
