"""The engine's HTTP face: vLLM's adapter protocol plus OpenAI chat completions.

    POST /v1/load_lora_adapter     {"lora_name", "lora_path"} -> 200 text (vLLM wording);
                                   ``lora_path`` is a key in the adapter store, never a path
                                   (``serving/adapter_store.py``)
    POST /v1/unload_lora_adapter   {"lora_name"}              -> 200 text, 404 if not loaded
    GET  /v1/models[/{model}]      the base model and the loaded adapters (``parent`` like vLLM;
                                   an adapter's ``root`` is its name: no locations are shown)
    POST /v1/chat/completions      OpenAI ChatCompletion, or SSE chunks with ``stream: true``
    GET  /health                   {"status": "ok", "base_model", "adapters"}; 503 while loading
    GET  /metrics                  Prometheus: request latency by route, adapter loads/evictions

The request and response models of the adapter protocol are ``loraforge.contracts.engine``'s,
shared with the client (``loraforge.engines``). Every error is the OpenAI envelope
``{"error": {"message", "type", "param", "code"}}`` built by ``contracts.envelope``, as the API
builds it; a request naming a model that is not loaded gets 404 with ``code: "model_not_found"``.
Importing this module loads no torch: the engine is built by the factory at startup (lifespan),
in the background, so the port answers at once: ``/health`` (and every route needing the model) is
a 503 ``engine_not_ready`` until the base model is loaded. A load that fails is logged and stops
the process with exit code 1 (``run_engine``), for a supervisor to restart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, cast

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.asgi import BodyLimitMiddleware, StrictJSONRoute
from loraforge.contracts.engine import (
    EngineHealth,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from loraforge.contracts.envelope import error_body, validation_error
from loraforge.ops.metrics import EngineMetrics, RequestTimer
from loraforge.serving.adapter_store import AdapterStore
from loraforge.serving.errors import (
    AdapterNotLoaded,
    AdapterStoreUnavailable,
    AuthenticationFailed,
    EngineError,
    EngineNotReady,
    InvalidRequest,
    UnknownBaseModel,
)
from loraforge.serving.protocol import (
    ChatCompletionRequest,
    assistant_message,
    chat_chunk,
    chat_completion,
    completion_id,
    now,
    usage,
)
from loraforge.serving.tools import ToolPlan, ToolStream, call_deltas, plan_tools, read_calls

if TYPE_CHECKING:
    from loraforge.catalog import BaseModelEntry
    from loraforge.serving.engine import GenerationRequest, GenerationResult, LoadedAdapter
    from loraforge.settings import Settings

logger = logging.getLogger(__name__)

# The ``code`` of errors Starlette raises itself.
_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


class ServingEngine(Protocol):
    """What the routes need from :class:`loraforge.serving.engine.Engine` (fakes may stand in)."""

    entry: BaseModelEntry

    @property
    def base_model(self) -> str: ...
    def loaded_adapters(self) -> list[str]: ...
    def describe_adapters(self) -> list[LoadedAdapter]: ...
    def load_adapter(self, name: str, path: str | Path) -> bool: ...
    def unload_adapter(self, name: str) -> None: ...
    def prepare(
        self,
        model_name: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = ...,
        temperature: float = ...,
        top_p: float = ...,
        seed: int | None = ...,
        stop: str | Sequence[str] | None = ...,
        tools: ToolPlan = ...,
    ) -> GenerationRequest: ...
    def run(self, request: GenerationRequest) -> GenerationResult: ...
    def run_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...
    def run_stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Any: ...  # Iterator[str | GenerationResult]


def get_engine(request: Request) -> ServingEngine:
    """The app's engine; 503 while the base model is still loading (or failed to load)."""
    engine: ServingEngine | None = request.app.state.engine
    if engine is None:
        failed: str | None = request.app.state.load_error
        if failed:
            raise EngineNotReady(f"The engine could not load its base model: {failed}")
        raise EngineNotReady("The engine is still loading its base model.")
    return engine


def check_api_key(request: Request) -> None:
    """Require ``Authorization: Bearer <api_key>`` when the app was given a key (like vLLM's --api-key)."""
    key: str | None = request.app.state.api_key
    sent = request.headers.get("authorization", "")
    if key and not secrets.compare_digest(sent.encode(), f"Bearer {key}".encode()):
        raise AuthenticationFailed("Incorrect API key provided.")


EngineDep = Annotated[ServingEngine, Depends(get_engine)]
router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)], route_class=StrictJSONRoute)
health_router = APIRouter()


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(
    body: LoadLoRAAdapterRequest, engine: EngineDep, request: Request
) -> PlainTextResponse:
    """Hot-load a LoRA adapter from the adapter store; loading the same name and key again is a no-op."""
    store: AdapterStore | None = request.app.state.adapter_store
    if store is None:
        raise AdapterStoreUnavailable("This engine has no adapter store configured.")
    path = await run_in_threadpool(store.resolve, body.lora_name, body.lora_path)
    await run_in_threadpool(engine.load_adapter, body.lora_name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, engine: EngineDep) -> PlainTextResponse:
    """Unload a LoRA adapter (404 if it is not loaded)."""
    await run_in_threadpool(engine.unload_adapter, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _model_cards(engine: ServingEngine) -> list[ModelCard]:
    entry = engine.entry
    cards = [ModelCard(id=entry.id, created=entry.created, owned_by=entry.owned_by, root=entry.weights)]
    for adapter in engine.describe_adapters():
        cards.append(
            ModelCard(
                id=adapter.name,
                created=adapter.manifest.created_at,
                owned_by=entry.owned_by,
                root=adapter.name,  # not its directory: where adapters are kept is the engine's business
                parent=entry.id,
            )
        )
    return cards


@router.get("/models")
async def list_models(engine: EngineDep) -> ModelList:
    """The base model and every loaded adapter."""
    return ModelList(data=_model_cards(engine))


@router.get("/models/{model:path}")
async def retrieve_model(model: str, engine: EngineDep) -> ModelCard:
    """One model card (base model or loaded adapter)."""
    for card in _model_cards(engine):
        if card.id == model:
            return card
    raise AdapterNotLoaded(model)


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, engine: EngineDep) -> Response:
    """OpenAI chat completions; Server-Sent Events when ``stream`` is true.

    ``n > 1`` is served as ``n`` rows of one batch (seeded: choice ``i`` uses ``seed + i``), for
    non-streaming requests; streaming ``n > 1`` is refused with a 400.
    """
    n = body.n or 1
    if n > 1 and body.stream:
        raise InvalidRequest("n > 1 is not supported with stream=true; send n=1 or stream=false.", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported by this engine.", param="logprobs")
    plan = plan_tools(body)
    request = await run_in_threadpool(
        engine.prepare,
        body.model,
        [message.model_dump() for message in body.messages],
        max_tokens=body.budget,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop,
        **({"tools": plan} if plan.tools else {}),
    )
    cid, created = completion_id(), now()
    if body.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        events = _sse_events(engine, request, body, cid, created, plan)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    if n == 1:
        results = [await run_in_threadpool(engine.run, request)]
    else:
        seeds = [None if request.seed is None else request.seed + i for i in range(n)]
        copies = [dataclasses.replace(request, seed=seed) for seed in seeds]
        results = await run_in_threadpool(engine.run_many, copies)
    return JSONResponse(
        chat_completion(
            cid=cid,
            created=created,
            model=body.model,
            choices=[_choice(plan, request, r) for r in results],
            prompt_tokens=results[0].prompt_tokens,
            completion_tokens=sum(r.completion_tokens for r in results),
        )
    )


def _choice(
    plan: ToolPlan, request: GenerationRequest, result: GenerationResult
) -> tuple[dict[str, Any], str]:
    """One choice's message and finish reason: the tool calls the output holds, else its text."""
    calls = read_calls(plan, request.tool_format, request.prefill + result.text)
    if calls:
        return assistant_message(None, calls), "tool_calls"
    return assistant_message(request.prefill + result.text), result.finish_reason


def _event(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"  # every event has a data line: the SDK crashes on data-less events


async def _sse_events(
    engine: ServingEngine,
    request: GenerationRequest,
    body: ChatCompletionRequest,
    cid: str,
    created: int,
    plan: ToolPlan,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any] | None, finish: str | None = None, used: Any = None) -> str:
        return _event(
            chat_chunk(
                cid=cid,
                created=created,
                model=body.model,
                delta=delta,
                finish_reason=finish,
                include_usage=body.include_usage,
                usage_value=used,
            )
        )

    cancel = threading.Event()  # set when the client goes away: generation stops at the next token
    items = engine.run_stream(request, cancel=cancel)
    tools = ToolStream(plan, request.tool_format, request.prefill)
    try:
        # With tools the answer may be calls: content stays null until text is sent (as OpenAI's).
        yield chunk({"role": "assistant", "content": None if tools.parsing else ""})
        result: Any = None
        while (item := await run_in_threadpool(next, items, None)) is not None:
            if isinstance(item, str):
                if text := tools.feed(item):
                    yield chunk({"content": text})
            else:
                result = item
        held, calls = tools.finish()
        if held:
            yield chunk({"content": held})
        for delta in call_deltas(calls or []):
            yield chunk(delta)
        yield chunk({}, "tool_calls" if calls else result.finish_reason)
        if body.include_usage:
            yield chunk(None, used=usage(result.prompt_tokens, result.completion_tokens))
        yield _event("[DONE]")
    except EngineError as exc:  # e.g. the adapter was evicted mid-request
        yield _event(exc.to_envelope())
    except Exception:
        logger.exception("generation failed mid-stream")
        yield _event(
            error_body(
                "The server had an error while processing your request.", "server_error", None, "server_error"
            )
        )
    finally:
        cancel.set()


@health_router.get("/health", response_model_exclude_none=True)
async def health(engine: EngineDep) -> EngineHealth:
    """Liveness, what is loaded, and batching counters (``stats``) when the engine keeps them."""
    stats = getattr(engine, "stats", None)
    return EngineHealth(
        status="ok",
        base_model=engine.base_model,
        adapters=engine.loaded_adapters(),
        stats=stats() if callable(stats) else None,
    )


@health_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this engine (``loraforge.ops.metrics``)."""
    registry: EngineMetrics = request.app.state.metrics
    engine: ServingEngine | None = request.app.state.engine
    registry.loaded.set(len(engine.loaded_adapters()) if engine is not None else 0)
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------- errors
async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    # The API's reading of a failed validation, so both report the same ``param`` and message.
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    message, param, code = validation_error(errors)
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return JSONResponse(exc.to_envelope(), status_code=exc.status_code)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # Starlette's own (unknown URL, wrong method) and ``BadJSONValue`` (its own param and code).
    body = error_body(
        str(exc.detail),
        "invalid_request_error" if exc.status_code < 500 else "server_error",
        getattr(exc, "param", None),
        getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "invalid_request"),
    )
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    body = error_body(
        "The server had an error while processing your request.", "server_error", None, "server_error"
    )
    return JSONResponse(body, status_code=500)


# ---------------------------------------------------------------------------------------- app
def create_engine_app(
    engine_or_factory: ServingEngine | Callable[[], ServingEngine],
    *,
    api_key: str | None = None,
    adapter_store: AdapterStore | None = None,
    title: str = "loraforge engine",
    metrics: EngineMetrics | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    max_request_bytes: int | None = None,
) -> FastAPI:
    """Build the engine's FastAPI app.

    Args:
        engine_or_factory: a ready engine (tests), or a zero-argument callable that builds one;
            the callable runs at startup (lifespan), in a background thread, never at import.
        api_key: if set, every ``/v1`` route requires ``Authorization: Bearer <api_key>``.
        adapter_store: where ``load_lora_adapter`` fetches adapters; None: it refuses (503).
        title: OpenAPI title.
        metrics: the engine's metrics (the factory's engine should report to the same object);
            default: a fresh one.
        on_load_failure: called with the error when the factory fails (``run_engine`` stops
            the server); the app keeps answering 503 with the reason either way.
        max_request_bytes: refuse request bodies over this many bytes with a 413 before
            parsing them (None: no limit).

    Returns:
        The app; serve it with uvicorn (see :func:`run_engine`).
    """
    # Duck-typed so that test fakes need only the methods they use.
    engine = cast(ServingEngine, engine_or_factory) if hasattr(engine_or_factory, "prepare") else None
    factory = None if engine is not None else cast(Callable[[], ServingEngine], engine_or_factory)

    def load(app: FastAPI) -> None:
        assert factory is not None
        try:
            app.state.engine = factory()
        except BaseException as exc:  # noqa: BLE001 - reported, then the process stops
            logger.exception("the engine could not load its base model")
            app.state.load_error = f"{type(exc).__name__}: {exc}"[:500]
            if on_load_failure is not None:
                on_load_failure(exc)
            return
        logger.info("engine ready: %s", app.state.engine.base_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if app.state.engine is None and factory is not None:
            loader = threading.Thread(target=load, args=(app,), name="engine-load", daemon=True)
            loader.start()
        yield
        if loader is not None:
            await run_in_threadpool(loader.join)  # a model half-loaded is not closed mid-way
        close = getattr(app.state.engine, "close", None)
        if factory is not None and callable(close):  # an engine we built: stop its batching thread
            await run_in_threadpool(close)

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.engine = engine
    app.state.load_error = None
    app.state.api_key = api_key
    app.state.metrics = metrics or EngineMetrics()
    app.state.adapter_store = adapter_store
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled_error)
    app.include_router(router)
    app.include_router(health_router)
    if max_request_bytes is not None:
        app.add_middleware(BodyLimitMiddleware, limit=max_request_bytes)
    app.add_middleware(RequestTimer, histogram=app.state.metrics.requests)
    return app


def run_engine(
    settings: Settings,
    base_model: str,
    host: str | None = None,
    port: int | None = None,
    *,
    max_loaded_adapters: int = 16,
    max_batch_size: int = 8,
    batch_window_ms: float = 5.0,
    api_key: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``base_model`` with uvicorn until interrupted (``loraforge engine --base MODEL``).

    Args:
        settings: service settings (catalog, models dir, torch threads, default host/port).
        base_model: catalog id or alias of the model to serve.
        host: bind address; default ``settings.engine_host``.
        port: port; default ``settings.engine_port``.
        max_loaded_adapters: LRU capacity of hot-loaded adapters.
        max_batch_size: most concurrent requests per ``generate`` call.
        batch_window_ms: how long a batch waits for more requests to join.
        api_key: optional bearer key required on ``/v1`` routes.
        log_level: uvicorn log level.

    Raises:
        UnknownBaseModel: ``base_model`` is not in the catalog (checked before binding the port).
        SystemExit: with code 1 when the base model could not be loaded (after logging why).
    """
    import uvicorn

    from loraforge.catalog import load_catalog

    if load_catalog(settings.models_config).get(base_model) is None:
        raise UnknownBaseModel(f"The base model `{base_model}` is not in the model catalog.")

    metrics = EngineMetrics()

    def factory() -> ServingEngine:
        from loraforge.serving.engine import load_engine

        return load_engine(
            settings,
            base_model,
            max_loaded_adapters=max_loaded_adapters,
            max_batch_size=max_batch_size,
            batch_window_s=batch_window_ms / 1000,
            metrics=metrics,
        )

    failed: list[BaseException] = []

    def stop(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_engine_app(
        factory,
        api_key=api_key,
        adapter_store=AdapterStore.from_settings(settings),
        metrics=metrics,
        on_load_failure=stop,
        max_request_bytes=settings.max_request_bytes,
    )
    config = uvicorn.Config(
        app, host=host or settings.engine_host, port=port or settings.engine_port, log_level=log_level
    )
    server = uvicorn.Server(config)
    server.run()
    if failed:
        raise SystemExit(1)
