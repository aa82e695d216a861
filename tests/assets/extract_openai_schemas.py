"""Extract the component schemas our tests validate responses against from OpenAI's spec.

OpenAI publishes its API as one OpenAPI document (``openai-openapi.yaml``, about 3 MB, from
github.com/openai/openai-openapi). The tests need only a few of its component schemas, so this
keeps those and every schema they ``$ref`` transitively, in ``openai-schemas.json`` beside this
script; ``$ref``s keep their ``#/components/schemas/...`` form and resolve within the extract.

The extract in the repository was made from the spec whose ``info`` reads
``title: OpenAI API``, ``version: 2.3.0`` (recorded in the extract's ``info``). To refresh it:

    python tests/assets/extract_openai_schemas.py path/to/openai-openapi.yaml
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("openai-schemas.json")
_PREFIX = "#/components/schemas/"

# What tests/unit/test_openapi_schemas.py validates our responses against.
ROOTS = (
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "Upload",
    "UploadPart",
    "FineTuningJob",
    "ListPaginatedFineTuningJobsResponse",
    "FineTuningJobEvent",
    "ListFineTuningJobEventsResponse",
    "FineTuningJobCheckpoint",
    "ListFineTuningJobCheckpointsResponse",
    "Model",
    "ListModelsResponse",
    "DeleteModelResponse",
    "ErrorResponse",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "Batch",
    "ListBatchesResponse",
)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_PREFIX):
            yield ref[len(_PREFIX) :]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _draft_2020_12(node: Any) -> Any:
    """OpenAPI 3.0's boolean ``exclusiveMinimum``/``exclusiveMaximum`` (beside ``minimum``/
    ``maximum``) as JSON Schema 2020-12's numeric ones, which the tests' validator speaks: read as
    2020-12, ``exclusiveMinimum: true`` is the bound 1 and refuses e.g. OpenAI's own ``beta: 0.5``."""
    if isinstance(node, list):
        return [_draft_2020_12(value) for value in node]
    if not isinstance(node, dict):
        return node
    out = {key: _draft_2020_12(value) for key, value in node.items()}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(exclusive) is True and bound in out:
            out[exclusive] = out.pop(bound)
        elif out.get(exclusive) is False:
            del out[exclusive]
    return out


def extract(spec: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    """The spec's ``info`` and the component schemas ``roots`` need, closed under ``$ref``.

    Args:
        spec: the parsed OpenAPI document.
        roots: the component schemas to keep.

    Returns:
        ``{"info": ..., "components": {"schemas": {...}}}``, schemas sorted by name.
    """
    schemas = spec["components"]["schemas"]
    kept: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = _draft_2020_12(schemas[name])
        todo.extend(_refs(schemas[name]))
    info = {k: spec["info"][k] for k in ("title", "version")}
    return {"info": info, "components": {"schemas": dict(sorted(kept.items()))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="OpenAI's openai-openapi.yaml")
    args = parser.parse_args()
    spec = yaml.load(args.spec.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    OUT.write_text(json.dumps(extract(spec), indent=1, sort_keys=False) + "\n")
    print(f"{OUT.name}: {len(json.loads(OUT.read_text())['components']['schemas'])} schemas")


if __name__ == "__main__":
    main()
