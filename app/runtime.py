"""The model side of the service: a verified store's generator, an adapter cache, and the work queue.

Concurrency. All torch work runs on ONE inference thread, never on the event loop. One, because
`adapted_logits` goes through `torch.func.functional_call`, which swaps the adapter's weights into the
shared classifier for the duration of the call: two threads would see each other's adapters. Torch's own
intra-op threads use the cores instead. In front of that thread, at most `max_pending` requests are
admitted (running + waiting); the next one is refused at once with 429 + Retry-After rather than queued
without bound, as trusted model servers do. Each request also has a deadline (`app/budget.py`): past it the
client gets 503, and the request's work is dropped at its next check (decoding, or when its batch forms).

Decoding. Uploads are decoded and shrunk to the model's size on ONE decode thread, which works on the next
requests while the inference thread runs the model (decoding was a quarter of the inference thread's time for
16-frame /classify requests on demo); one thread, so at most one full-size image is in memory at a time.

Batching (`app/batching.py`). Concurrent generations without shots or frames run as one batch
(`model_store.inference.infer_batch`: their DDIM draws share calls); concurrent /classify requests with the same
adapter (or none) send their frames through the classifier together (`model_store.classify`). Both compute in
blocks of a fixed size, so a request gets the same bytes whichever requests shared its batch. Few-shot and
zero-label requests run alone.

What a generated adapter is comes from `model_store.inference.infer`, the path `wildpdiff generate` takes too,
so the CLI and the service answer the same frame and options with the same tensors and policy.

Adapter ids are derived from what determines the adapter: store id, the uploaded file's sha256, seed,
steps, OOD policy, the method as requested (none: the store's serving table chooses) and any few-shot frames +
labels (generated), or the adapter's tensors (uploaded). So the same request gives the same id and the same
bytes, and a repeated request is answered from the LRU cache without generating again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.batching import Batcher, Job
from app.budget import Deadline, DeadlineExceeded
from app.errors import ApiError
from app.images import decode_image
from app.metrics import Metrics
from app.schemas import LabelScore, Prediction
from app.settings import Settings
from model_store.adapt import labels_to_indices
from model_store.backbone import normalize, to_uint8
from model_store.classify import NonFiniteScores, class_probabilities, top_labels
from model_store.generator import Generator
from model_store.inference import (
    METHODS,
    RETRIEVAL_METHODS,
    InferenceOptions,
    OutOfDistribution,
    check_method,
    infer_batch,
    load_serving_table,
    stored_ood_threshold,
)
from model_store.lora import adapter_bytes, load_adapter_bytes, save_adapter_dir, validate_adapter
from model_store.store import Store, code_version

log = logging.getLogger("app")


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes


@dataclass(frozen=True)
class Generation:
    """What a generated adapter depends on besides the background frame."""

    seed: int = 0
    steps: int | None = None  # None: the server's default
    policy: str | None = None  # out of distribution: generate | fallback | reject (None: the server's)
    method: str | None = None  # generate | anchored | knn_blend | nearest (None: the store's serving table)
    shots: tuple[Upload, ...] = ()  # labelled frames of the location, for few-shot selection (model_store/adapt.py)
    labels: tuple[str, ...] = ()  # one class name per shot
    refine_steps: int = 0
    frames: tuple[Upload, ...] = ()  # unlabelled frames of the location (model_store/zerolabel.py)


@dataclass
class Adapter:
    id: str
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]  # the safetensors __metadata__ (str -> str)
    distance: float | None  # condition distance to the nearest seen location (generated adapters only)
    in_distribution: bool | None  # distance <= the OOD threshold (generated adapters only)
    policy_applied: str | None = None  # generate | fallback-* | zerolabel | fewshot (generated only)
    method: str | None = None  # what served (`model_store.inference.Inference.method`; generated only)


class AdapterCache:
    """Bounded LRU of adapters by id. Touched only from the event loop, so it needs no lock."""

    def __init__(self, size: int, metrics: Metrics):
        self.size, self.metrics = size, metrics
        self._items: OrderedDict[str, Adapter] = OrderedDict()

    def get(self, adapter_id: str) -> Adapter | None:
        adapter = self._items.get(adapter_id)
        self.metrics.cache.labels("hit" if adapter else "miss").inc()
        if adapter:
            self._items.move_to_end(adapter_id)
        return adapter

    def put(self, adapter: Adapter) -> None:
        self._items[adapter.id] = adapter
        self._items.move_to_end(adapter.id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


class Runtime:
    def __init__(self, generator: Generator, store: Store, settings: Settings, metrics: Metrics):
        self.generator, self.store, self.settings, self.metrics = generator, store, settings, metrics
        self.device = next(generator.classifier.parameters()).device
        self.cache = AdapterCache(settings.adapter_cache_size, metrics)
        # A threshold calibrated into the store wins; the setting is the fallback for stores without one.
        threshold = stored_ood_threshold(store)
        self.ood_threshold = settings.ood_threshold if threshold is None else threshold
        self.serving = load_serving_table(store)  # which method serves which distance region
        # In every generated id: a re-evaluated store may serve another method for the same request.
        self.serving_digest = hashlib.sha256(json.dumps(self.serving.to_dict(), sort_keys=True).encode()).hexdigest()
        self.max_steps = generator.scheduler_config["num_train_timesteps"]
        self._pending = 0
        self.batcher = Batcher(settings.max_batch, settings.max_batch_wait_ms / 1000, lambda: self._pending, metrics)
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wildpdiff-decode")

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Runtime:
        """Open and verify the store, load the generator. Raises StoreError (or ValueError) if unusable."""
        torch.set_num_threads(settings.intra_op_threads())
        device = resolve_device(settings.device)
        store = Store(settings.store)
        generator = Generator.from_store(store, device=str(device))
        log.info("store %s loaded on %s (%d classes)", generator.store_id, device, len(generator.classes))
        return cls(generator, store, settings, metrics)

    def close(self) -> None:
        self._decoder.shutdown(wait=True, cancel_futures=True)
        self.batcher.close()

    # --- admission and the inference thread

    @contextmanager
    def _admit(self) -> Iterator[None]:
        if self._pending >= self.settings.max_pending:
            raise ApiError(
                429,
                f"server busy: {self._pending} requests in progress; retry later",
                {"Retry-After": str(self.settings.retry_after_s)},
            )
        self._pending += 1
        self.metrics.queue_depth.set(self._pending)
        try:
            yield
        finally:
            self._pending -= 1
            self.metrics.queue_depth.set(self._pending)

    async def _within(self, deadline: Deadline, work: Awaitable[Any]) -> Any:
        """`work`'s result; 503 once `deadline` passes, whether the work waits or runs."""
        try:
            return await asyncio.wait_for(work, deadline.remaining())
        except (TimeoutError, DeadlineExceeded):
            raise ApiError(
                503,
                f"the request did not finish within its deadline of {deadline.seconds:g} s (request_timeout_s): "
                "the server is busy or the request too heavy; retry later or send less work",
                {"Retry-After": str(self.settings.retry_after_s)},
            ) from None

    async def _run(self, job: Job) -> Any:
        """`job` on the inference thread, batched with others of its key."""
        return await self._within(job.deadline, self.batcher.submit(job))

    async def _off_loop(self, deadline: Deadline, fn, *args) -> Any:
        """`fn(*args)` on the decode thread."""
        return await self._within(deadline, asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args))

    # --- generation

    def _adapter_id(self, *parts: str) -> str:
        return hashlib.sha256("\0".join([self.generator.store_id, *parts]).encode()).hexdigest()[:32]

    async def create_adapter(
        self, backgrounds: list[Upload], request: Generation, deadline: Deadline | None = None
    ) -> Adapter:
        """An adapter for the location that `backgrounds` (one or more of its empty frames) show."""
        deadline = deadline or Deadline(self.settings.request_timeout_s)
        steps = request.steps or self.settings.default_steps
        if not 1 <= len(backgrounds) <= self.settings.max_backgrounds:
            raise ApiError(
                400, f"{len(backgrounds)} background frames in one request; give 1 to {self.settings.max_backgrounds}"
            )
        if steps > self.max_steps:
            raise ApiError(422, f"steps: at most {self.max_steps} for this store (its scheduler's timesteps)")
        if steps > self.settings.max_steps:
            raise ApiError(422, f"steps: at most {self.settings.max_steps} (max_steps)")
        if request.refine_steps > self.settings.max_refine_steps:
            raise ApiError(422, f"refine_steps: at most {self.settings.max_refine_steps}")
        if (work := len(request.shots) * request.refine_steps) > self.settings.max_refine_work:
            raise ApiError(
                422,
                f"{len(request.shots)} shots x {request.refine_steps} refine_steps = {work}, more than the limit of "
                f"{self.settings.max_refine_work} (max_refine_work); send fewer shots or fewer refine_steps",
            )
        if len(request.shots) > self.settings.max_images:
            raise ApiError(400, f"{len(request.shots)} shots in one request; the limit is {self.settings.max_images}")
        if len(request.frames) > self.settings.max_frames:
            raise ApiError(400, f"{len(request.frames)} frames in one request; the limit is {self.settings.max_frames}")
        if request.shots or request.labels:
            try:
                labels_to_indices(list(request.labels), self.generator.classes, len(request.shots))
            except ValueError as e:
                raise ApiError(422, f"shots: {e}") from None
        try:
            check_method(self.generator, request.method)
        except ValueError as e:
            raise ApiError(422, f"method: {e}") from None
        request = dataclasses.replace(request, steps=steps, policy=request.policy or self.settings.ood_policy)
        adapter_id = self._adapter_id(
            "generated",
            *(hashlib.sha256(background.data).hexdigest() for background in backgrounds),
            str(request.seed),
            str(steps),
            request.policy,
            request.method or f"auto:{self.serving_digest}",
            *(hashlib.sha256(shot.data).hexdigest() for shot in request.shots),
            *request.labels,
            str(request.refine_steps),
            "frames",
            *(hashlib.sha256(frame.data).hexdigest() for frame in request.frames),
        )
        if cached := self.cache.get(adapter_id):
            return cached
        # Shots and frames make a request's own heavy work (selection, adaptation): those run alone.
        key = None if request.shots or request.frames else "adapters"
        with self._admit():
            images, options = await self._off_loop(deadline, self._inputs, backgrounds, request, deadline)
            adapter = await self._run(Job(key, self._generate, (adapter_id, images, options), "adapters", deadline))
        self.metrics.generations.inc()
        self.cache.put(adapter)
        return adapter

    def _inputs(
        self, backgrounds: list[Upload], request: Generation, deadline: Deadline
    ) -> tuple[list[Image.Image], InferenceOptions]:
        """On the decode thread: a generation request's uploads -> what `infer` takes."""
        images = [self._decode(b, deadline) for b in backgrounds]
        options = InferenceOptions(
            seed=request.seed,
            steps=request.steps,
            frame_rule=self.settings.frame_rule,
            policy=request.policy,
            method=request.method,
            shots=self._pixels(list(request.shots), deadline) if request.shots else None,
            labels=request.labels,
            refine_steps=request.refine_steps,
            candidates=self.settings.fewshot_candidates,
            frames=self._pixels(list(request.frames), deadline) if request.frames else None,
            zerolabel_seconds=self.settings.zerolabel_seconds,
        )
        return images, options

    def _generate(self, jobs: list[tuple[str, list[Image.Image], InferenceOptions]]) -> list[Adapter | Exception]:
        """On the inference thread: generation requests -> their adapters (or errors), drawn together."""
        requests = [(images, options) for _, images, options in jobs]
        results = infer_batch(self.generator, requests, table=self.serving, ood_threshold=self.ood_threshold)
        return [self._adapter(adapter_id, result) for (adapter_id, _, _), result in zip(jobs, results, strict=True)]

    @staticmethod
    def _adapter(adapter_id: str, result) -> Adapter | Exception:
        if isinstance(result, OutOfDistribution):
            return ApiError(422, str(result), extra={"distance": result.distance, "ood_threshold": result.threshold})
        if isinstance(result, Exception):
            return result
        metadata = {"adapter_id": adapter_id, **result.metadata}
        return Adapter(
            adapter_id, result.state, metadata, result.distance, result.in_distribution, result.policy_applied,
            result.method,
        )  # fmt: skip

    async def adapter_file(self, adapter: Adapter, format: str) -> bytes:
        """The adapter as safetensors bytes, or as a PEFT folder zipped (format="peft"); off the event loop,
        as the PEFT writer touches the disk."""
        if format == "peft":
            return await run_in_threadpool(self._peft_zip, adapter)
        return await run_in_threadpool(adapter_bytes, adapter.state, adapter.metadata)

    def _peft_zip(self, adapter: Adapter) -> bytes:
        """A zip of `adapter_config.json` + `adapter_model.safetensors`; same adapter, same bytes."""
        buffer = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            base_model = f"wildpdiff:{self.generator.store_id}"
            save_adapter_dir(tmp, adapter.state, self.generator.layout, base_model, adapter.metadata)
            for path in sorted(Path(tmp).iterdir()):
                info = zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed: reproducible bytes
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
        return buffer.getvalue()

    # --- uploaded adapters

    def _parse_adapter(self, upload: Upload) -> Adapter:
        # An adapter is a few thousand floats; refusing big files first also bounds the safetensors header.
        limit = 8 * sum(torch.Size(s).numel() for s in self.generator.shapes.values()) + 65536
        if len(upload.data) > limit:
            raise ApiError(413, f"{upload.name}: {len(upload.data)} bytes is too large for this store's adapters")
        try:
            state, _ = load_adapter_bytes(upload.data)
            validate_adapter(state, self.generator.shapes)
        except ValueError as e:
            raise ApiError(422, f"{upload.name}: {e}") from None
        digest = hashlib.sha256(adapter_bytes(state, {})).hexdigest()
        adapter_id = self._adapter_id("uploaded", digest)
        return Adapter(adapter_id, state, {"adapter_id": adapter_id}, None, None)

    # --- classification

    async def classify(
        self,
        images: list[Upload],
        *,
        adapter_id: str | None = None,
        adapter: Upload | None = None,
        backgrounds: list[Upload] | None = None,
        generation: Generation = Generation(),
    ) -> tuple[Adapter | None, list[Prediction]]:
        if sum(bool(x) for x in (adapter_id is not None, adapter, backgrounds)) > 1:
            raise ApiError(422, "give at most one of adapter_id, adapter, background")
        if len(images) > self.settings.max_images:
            raise ApiError(400, f"{len(images)} images in one request; the limit is {self.settings.max_images}")
        deadline = Deadline(self.settings.request_timeout_s)
        chosen = None
        if adapter_id is not None:
            chosen = self.cache.get(adapter_id)
            if chosen is None:
                raise ApiError(404, f"unknown adapter id {adapter_id!r} (expired or never created): post it again")
        elif backgrounds:
            chosen = await self.create_adapter(backgrounds, generation, deadline)
        with self._admit():
            if adapter is not None:
                chosen = await self._off_loop(deadline, self._parse_adapter, adapter)
                self.cache.put(chosen)
            pixels = await self._off_loop(deadline, self._pixels, images, deadline)
            # Requests with the same adapter (or none) share the classifier's calls.
            key = ("classify", chosen.id if chosen else "")
            probs = await self._run(Job(key, self._classify, (pixels, chosen), "classify", deadline))
        return chosen, self._predictions(images, probs)

    def _classify(self, jobs: list[tuple[torch.Tensor, Adapter | None]]) -> list[torch.Tensor | ApiError]:
        """On the inference thread: the pixels of /classify requests with ONE adapter -> their class
        probabilities; the frames of all of them go through the classifier together."""
        pixels = [p for p, _ in jobs]
        adapter = jobs[0][1]
        state = adapter and adapter.state
        try:
            return list(class_probabilities(self.generator, torch.cat(pixels), state).split([len(p) for p in pixels]))
        except NonFiniteScores:
            # Only an adapter can do this (weights within the limits, yet too large together); find whose frames.
            return [self._probabilities_or_error(p, state) for p in pixels]

    def _probabilities_or_error(self, pixels: torch.Tensor, state) -> torch.Tensor | ApiError:
        try:
            return class_probabilities(self.generator, pixels, state)
        except NonFiniteScores as e:
            return ApiError(422, str(e))

    def _predictions(self, uploads: list[Upload], probs: torch.Tensor) -> list[Prediction]:
        return [
            Prediction(
                file=upload.name,
                label=top[0][0],
                score=top[0][1],
                top_k=[LabelScore(label=label, score=score) for label, score in top],
            )
            for upload, top in zip(uploads, top_labels(probs, self.generator.classes, self.settings.top_k), strict=True)
        ]

    def _pixels(self, uploads: list[Upload], deadline: Deadline) -> torch.Tensor:
        """Uploaded images -> (B, 3, S, S) normalised, on the model's device."""
        # Shrink each image to the model's size as soon as it is decoded: 64 highly compressible 40 MP
        # images fit in one upload, but must never be held in memory at full size all at once.
        size = self.generator.backbone_config.image_size
        small = [to_uint8(self._decode(upload, deadline), size) for upload in uploads]
        return normalize(torch.from_numpy(np.stack(small)).to(self.device), self.generator.backbone_config)

    def _decode(self, upload: Upload, deadline: Deadline) -> Image.Image:
        """One upload, on the decode thread; decoding is a request's main cost, so the deadline is checked before
        each image."""
        deadline.check()
        return decode_image(upload.data, upload.name, self.settings.max_image_pixels)

    # --- description

    def info(self) -> dict:
        g = self.generator
        return {
            "store_id": g.store_id,
            "base_model_hash": g.base_model_hash,
            "profile": self.store.manifest.get("profile", ""),
            "classes": g.classes,
            "lora": g.layout.to_dict(),
            "adapter_parameters": sum(torch.Size(s).numel() for s in g.shapes.values()),
            "device": str(self.device),
            "ood_threshold": self.ood_threshold,
            "ood_policy": self.settings.ood_policy,
            "fallback": "nearest" if g.location_means is not None else "base",
            "methods": [m for m in METHODS if g.location_means is not None or m not in RETRIEVAL_METHODS],
            "serving": self.serving.to_dict(),
            "versions": {"wild_p_diff": code_version(), "torch": torch.__version__},
        }
