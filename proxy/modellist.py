"""`GET …/models` answered with the group's redirect rules applied (REFERENCE.md §2.9).

Strict groups list only the models their rules name; other groups add those models to
the upstream's list. OpenAI's shape (`data`) and Gemini's native shape (`models`) are
both understood; anything else passes through unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson


def is_model_list(method: str, path: str) -> bool:
    return method == "GET" and path.rstrip("/").endswith(("/v1/models", "/v1beta/models",
                                                          "/v1beta/openai/models"))  # fmt: skip


def rewrite(body: bytes, models: list[str], strict: bool, first_page: bool) -> bytes | None:
    """The rewritten list, or None when the body is not a model list we understand."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("data"), list):
        listed = data["data"] if not strict else []
        present = {m.get("id") for m in listed if isinstance(m, dict)}
        extra = [openai_entry(m) for m in models if m not in present]
        data["data"] = listed + extra
    elif isinstance(data.get("models"), list):
        if strict:
            data["models"] = [gemini_entry(m) for m in models]
            data.pop("nextPageToken", None)
        elif first_page:
            present = {str(m.get("name", "")).removeprefix("models/") for m in data["models"]
                       if isinstance(m, dict)}  # fmt: skip
            data["models"] += [gemini_entry(m) for m in models if m not in present]
    else:
        return None
    return orjson.dumps(data)


def openai_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "system"}


def gemini_entry(model: str) -> dict[str, Any]:
    return {"name": f"models/{model}", "displayName": model,
            "supportedGenerationMethods": ["generateContent"]}  # fmt: skip
