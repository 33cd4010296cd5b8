"""Response bodies, with examples for the OpenAPI page at /docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorOut(BaseModel):
    """Every 4xx (and the never-expected 5xx) has this body."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": "night.png: not an image"}]})

    error: str = Field(description="what was wrong with the request")


class LabelScore(BaseModel):
    label: str
    score: float = Field(ge=0, le=1, description="softmax probability")


class Prediction(BaseModel):
    file: str = Field(description="the uploaded file's name")
    label: str
    score: float = Field(ge=0, le=1)
    top_k: list[LabelScore]


class ClassifyOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "adapter_id": "3f6a1c0e9b2d4e5f8a7b6c5d4e3f2a1b",
                    "predictions": [
                        {
                            "file": "frame_0001.jpg",
                            "label": "zebra",
                            "score": 0.91,
                            "top_k": [{"label": "zebra", "score": 0.91}, {"label": "wildebeest", "score": 0.06}],
                        }
                    ],
                }
            ]
        }
    )

    adapter_id: str | None = Field(description="the adapter applied; null = the pretrained backbone")
    predictions: list[Prediction]


class HealthOut(BaseModel):
    status: str = Field(examples=["ok"])


class InfoOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "store_id": "9c1d2e3f4a5b6c7d",
                    "base_model_hash": "4b2a...e9",
                    "profile": "demo",
                    "classes": ["empty", "zebra", "wildebeest"],
                    "lora": {"rank": 2, "alpha": 4.0, "blocks": 6},
                    "adapter_parameters": 6144,
                    "device": "cpu",
                    "ood_threshold": 2.0,
                    "ood_policy": "fallback",
                    "fallback": "nearest",
                    "methods": ["generate", "anchored", "knn_blend", "nearest"],
                    "serving": {
                        "version": 1,
                        "regions": [
                            {"region": "seen", "max_distance": 1.4, "method": "generate"},
                            {"region": "between", "max_distance": 2.3, "method": "anchored"},
                            {"region": "ood", "max_distance": None, "method": "knn_blend"},
                        ],
                        "knn_blend": {"k": 3, "weighting": "inverse_distance"},
                        "anchored": {"strength": 0.5, "steps": 10},
                        "chosen_on": "val splits of the evaluated seen, interp and unseen locations",
                    },
                    "versions": {"wild_p_diff": "0.1.0", "torch": "2.14.1"},
                }
            ]
        }
    )

    store_id: str
    base_model_hash: str = Field(description="sha256 of the backbone weights the adapters apply to")
    profile: str
    classes: list[str]
    lora: dict[str, float | int] = Field(description="rank, alpha and number of adapted blocks")
    adapter_parameters: int
    device: str
    ood_threshold: float = Field(description="condition distance above which a background is out of distribution")
    ood_policy: str = Field(description="default policy out of distribution: generate | fallback | reject")
    fallback: str = Field(description="what fallback serves: nearest (seen location's mean adapter) or base")
    methods: list[str] = Field(description="the methods this store can serve (a request's `method`)")
    serving: dict = Field(
        description="the serving table: per region of condition distance (the first whose max_distance is null "
        "or >= the distance), the method served when a request names none; knn_blend and anchored settings"
    )
    versions: dict[str, str]
