"""HTTP routes (docs/design.md, the HTTP API). Thin: read the form, call the runtime, shape the answer."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import schemas
from app.budget import check_request_pixels
from app.errors import ApiError
from app.runtime import Adapter, Generation, Runtime, Upload
from model_store.inference import METHODS

router = APIRouter()

ERRORS = {code: {"model": schemas.ErrorOut} for code in (400, 401, 404, 413, 415, 422, 429, 503)}
GET_ERRORS = {code: {"model": schemas.ErrorOut} for code in (401, 503)}  # a missing API key; draining
MAX_SEED = 2**32 - 1


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
Seed = Annotated[int, Form(ge=0, le=MAX_SEED, description="sampling seed; same seed, same adapter")]
Steps = Annotated[int | None, Form(ge=1, description="DDIM sampling steps (default: the server's)")]
Policy = Annotated[
    Literal["generate", "fallback", "reject"] | None,
    Form(description="out of distribution: generate anyway, serve a fallback adapter, or refuse (422)"),
]
Method = Annotated[
    Literal[METHODS] | None,
    Form(
        description="what serves: generate (DDIM from noise), anchored (DDIM from the knn_blend adapter), "
        "knn_blend (blend of the nearest seen locations' mean adapters) or nearest; default: the store's "
        "serving table for the background's distance region (see /info)"
    ),
]


async def to_upload(file: UploadFile, fallback: str) -> Upload:
    return Upload((file.filename or fallback)[:200], await file.read())


def adapter_headers(adapter: Adapter) -> dict[str, str]:
    return {
        "X-Adapter-Id": adapter.id,
        "X-Condition-Distance": adapter.metadata["condition_distance"],
        "X-In-Distribution": str(adapter.in_distribution).lower(),
        "X-Policy-Applied": adapter.policy_applied or "",
        "X-Method": adapter.method or "",
    }


def header_doc(description: str) -> dict:
    return {"description": description, "schema": {"type": "string"}}


ADAPTER_RESPONSE = {
    "description": "The adapter: safetensors bytes, or a zip of a PEFT adapter folder (format=peft).",
    "content": {"application/octet-stream": {}, "application/zip": {}},
    "headers": {
        "X-Adapter-Id": header_doc("id for POST /classify (adapter_id)"),
        "X-Condition-Distance": header_doc(
            "distance to the nearest seen location (1 = typical of training frames; several frames: the smallest)"
        ),
        "X-In-Distribution": header_doc("true when the distance is within the OOD threshold (see /info)"),
        "X-Policy-Applied": header_doc("generate | fallback-nearest | fallback-base | zerolabel | fewshot"),
        "X-Method": header_doc(
            "what served: generate | anchored | knn_blend | nearest | base (fallback without means) | fewshot"
        ),
    },
}


@router.post(
    "/adapters",
    response_class=Response,
    responses={200: ADAPTER_RESPONSE, **ERRORS},
    dependencies=[Depends(check_request_pixels)],
)
async def create_adapter(
    runtime: RuntimeDep,
    background: Annotated[
        list[UploadFile],
        File(description="one or more empty frames of the location (JPEG, PNG, WebP, GIF), e.g. day and night"),
    ],
    seed: Seed = 0,
    steps: Steps = None,
    format: Annotated[Literal["safetensors", "peft"], Form()] = "safetensors",
    policy: Policy = None,
    method: Method = None,
    shots: Annotated[list[UploadFile] | None, File(description="labelled frames of the location (few-shot)")] = None,
    labels: Annotated[list[str] | None, Form(description="one class name per shot file")] = None,
    refine_steps: Annotated[int, Form(ge=0, description="gradient steps on the shots after selection")] = 0,
    frames: Annotated[
        list[UploadFile] | None,
        File(description="unlabelled frames of the location (animals in them, no labels): zero-label adaptation"),
    ] = None,
) -> Response:
    """Generate a LoRA adapter for the location shown in `background` (chosen on `shots` when given, else
    chosen and adapted on unlabelled `frames` when given, as the store's serving table says for the region).

    Several `background` frames (e.g. day and night) are combined by the server's frame rule (default: the
    mean of their condition features)."""
    generation = Generation(
        seed=seed,
        steps=steps,
        policy=policy,
        method=method,
        shots=tuple([await to_upload(shot, f"shots[{i}]") for i, shot in enumerate(shots or [])]),
        labels=tuple(labels or []),
        refine_steps=refine_steps,
        frames=tuple([await to_upload(frame, f"frames[{i}]") for i, frame in enumerate(frames or [])]),
    )
    backgrounds = [await to_upload(frame, f"background[{i}]") for i, frame in enumerate(background)]
    adapter = await runtime.create_adapter(backgrounds, generation)
    body = await runtime.adapter_file(adapter, format)
    media_type, suffix = ("application/zip", "zip") if format == "peft" else ("application/octet-stream", "safetensors")
    headers = adapter_headers(adapter)
    headers["Content-Disposition"] = f'attachment; filename="adapter-{adapter.id}.{suffix}"'
    return Response(body, media_type=media_type, headers=headers)


@router.post(
    "/classify", response_model=schemas.ClassifyOut, responses=ERRORS, dependencies=[Depends(check_request_pixels)]
)
async def classify(
    runtime: RuntimeDep,
    request: Request,
    response: Response,
    images: Annotated[list[UploadFile], File(description="one or more frames to classify")],
    adapter_id: Annotated[
        str | None, Form(min_length=1, max_length=64, description="an id returned by /adapters")
    ] = None,
    adapter: Annotated[UploadFile | None, File(description="a safetensors adapter")] = None,
    background: Annotated[
        list[UploadFile] | None, File(description="generate an adapter from this frame (or frames) first")
    ] = None,
    seed: Seed = 0,
    steps: Steps = None,
    policy: Policy = None,
    method: Method = None,
) -> schemas.ClassifyOut:
    """Classify frames with one adapter (by id, uploaded, or generated from a background) or none; `X-Method`
    says what served a generated one."""
    if adapter_id is None and (await request.form()).get("adapter_id") == "":
        # FastAPI reads an empty form field as absent, which would silently mean the base model
        raise ApiError(422, "adapter_id: empty; give an id from /adapters, or leave the field out for the base model")
    chosen, predictions = await runtime.classify(
        [await to_upload(image, f"images[{i}]") for i, image in enumerate(images)],
        adapter_id=adapter_id,
        adapter=adapter and await to_upload(adapter, "adapter"),
        backgrounds=[await to_upload(frame, f"background[{i}]") for i, frame in enumerate(background or [])],
        generation=Generation(seed=seed, steps=steps, policy=policy, method=method),
    )
    if background and chosen is not None:
        response.headers["X-Method"] = chosen.method or ""
    return schemas.ClassifyOut(adapter_id=chosen and chosen.id, predictions=predictions)


@router.get("/healthz", response_model=schemas.HealthOut)
async def healthz() -> schemas.HealthOut:
    """The process is alive."""
    return schemas.HealthOut(status="ok")


@router.get("/readyz", response_model=schemas.HealthOut, responses={503: {"model": schemas.ErrorOut}})
async def readyz() -> schemas.HealthOut:
    """The store is loaded and its generator's files verified (`create_app` refuses to build an app otherwise);
    503 while the server drains (app/drain.py)."""
    return schemas.HealthOut(status="ready")


@router.get("/info", response_model=schemas.InfoOut, responses=GET_ERRORS)
async def info(runtime: RuntimeDep) -> schemas.InfoOut:
    """Classes, LoRA layout, versions and id of the loaded store."""
    return schemas.InfoOut(**runtime.info())


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **GET_ERRORS})
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
