"""A small Python client for the service (httpx).

    with WildPDiffClient("http://127.0.0.1:8000", api_key=os.environ.get("WILDPDIFF_API_KEY")) as client:
        adapter = client.generate_adapter("background.jpg", seed=0)  # or several frames: ["day.jpg", "night.jpg"]
        Path(f"{adapter.id}.safetensors").write_bytes(adapter.data)
        result = client.classify(["frame1.jpg", "frame2.jpg"], adapter_id=adapter.id)
        # a location unlike any seen one: refuse rather than guess, or adapt to a few labelled frames
        adapter = client.generate_adapter("bg.jpg", policy="reject")
        adapter = client.generate_adapter("bg.jpg", shots=["a.jpg", "b.jpg"], labels=["zebra", "empty"])
        # a method of your own instead of the store's serving table (adapter.method says what served)
        adapter = client.generate_adapter("bg.jpg", method="knn_blend")

A refusal raises `WildPDiffError` with the server's status and message. When the server is busy (429), past a
request's deadline or shutting down (503), the client waits for `Retry-After` and tries again, `retries` times.
`api_key`: one of the server's keys when it has any (sent as `Authorization: Bearer <key>`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

FileLike = str | Path | bytes  # a path, or the file's bytes
RETRIED = (429, 503)  # busy, or past the deadline / shutting down: both say Retry-After
Method = Literal["generate", "anchored", "knn_blend", "nearest"]


class WildPDiffError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message


@dataclass
class GeneratedAdapter:
    id: str
    data: bytes  # safetensors bytes, or a zip of a PEFT folder (format="peft")
    condition_distance: float
    in_distribution: bool  # condition distance <= the server's OOD threshold
    policy_applied: str  # generate | fallback-nearest | fallback-base | zerolabel | fewshot
    method: str  # what served: generate | anchored | knn_blend | nearest | base | fewshot
    headers: httpx.Headers


def _frames(background: FileLike | list[FileLike]) -> list[tuple[str, tuple[str, bytes]]]:
    """One background frame or several of the same location -> multipart `background` fields."""
    frames = background if isinstance(background, list) else [background]
    return [_file("background", frame, f"background{i}") for i, frame in enumerate(frames)]


def _file(field: str, item: FileLike, default_name: str) -> tuple[str, tuple[str, bytes]]:
    if isinstance(item, bytes):
        return field, (default_name, item)
    return field, (Path(item).name, Path(item).read_bytes())


class WildPDiffClient:
    def __init__(self, base_url: str, timeout: float = 120.0, retries: int = 2, api_key: str | None = None):
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def __enter__(self) -> WildPDiffClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, url, **kwargs)
            if response.status_code not in RETRIED or attempt == self.retries:
                break
            time.sleep(float(response.headers.get("Retry-After", "1")))
        if response.is_error:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise WildPDiffError(response.status_code, message)
        return response

    def generate_adapter(
        self,
        background: FileLike | list[FileLike],
        seed: int = 0,
        steps: int | None = None,
        format: Literal["safetensors", "peft"] = "safetensors",
        policy: Literal["generate", "fallback", "reject"] | None = None,
        shots: list[FileLike] | None = None,
        labels: list[str] | None = None,
        refine_steps: int = 0,
        method: Method | None = None,
        frames: list[FileLike] | None = None,
    ) -> GeneratedAdapter:
        """`background`: one empty frame of the location, or several (day and night; the server combines them).
        `policy` overrides the server's out-of-distribution policy and `method` the store's serving table;
        `shots` (labelled frames, one class name per file in `labels`) make it choose among generated
        candidates on them, then refine `refine_steps`; else unlabelled `frames` of the location let the server
        choose and adapt without labels, as the store's serving table says for the region."""
        data: dict[str, str | list[str]] = {"seed": str(seed), "format": format, "refine_steps": str(refine_steps)}
        if steps is not None:
            data["steps"] = str(steps)
        if policy is not None:
            data["policy"] = policy
        if method is not None:
            data["method"] = method
        if labels:
            data["labels"] = list(labels)
        files = _frames(background)
        files += [_file("shots", shot, f"shot{i}") for i, shot in enumerate(shots or [])]
        files += [_file("frames", frame, f"frame{i}") for i, frame in enumerate(frames or [])]
        response = self._request("POST", "/adapters", files=files, data=data)
        return GeneratedAdapter(
            id=response.headers["X-Adapter-Id"],
            data=response.content,
            condition_distance=float(response.headers["X-Condition-Distance"]),
            in_distribution=response.headers["X-In-Distribution"] == "true",
            policy_applied=response.headers.get("X-Policy-Applied", ""),
            method=response.headers.get("X-Method", ""),
            headers=response.headers,
        )

    def classify(
        self,
        images: list[FileLike],
        *,
        adapter_id: str | None = None,
        adapter: FileLike | None = None,
        background: FileLike | list[FileLike] | None = None,
        seed: int | None = None,
        steps: int | None = None,
        method: Method | None = None,
    ) -> dict:
        """`{adapter_id, predictions: [{file, label, score, top_k}]}`; give at most one of adapter_id, adapter
        (a safetensors file) and background (generate first, with `seed`, `steps` and `method` as in
        `generate_adapter`); none classifies with the pretrained backbone."""
        files = [_file("images", image, f"image{i}") for i, image in enumerate(images)]
        if adapter is not None:
            files.append(_file("adapter", adapter, "adapter.safetensors"))
        if background is not None:
            files += _frames(background)
        fields = {"adapter_id": adapter_id, "seed": seed, "steps": steps, "method": method}
        data = {key: str(value) for key, value in fields.items() if value is not None}
        return self._request("POST", "/classify", files=files, data=data).json()

    def info(self) -> dict:
        return self._request("GET", "/info").json()
