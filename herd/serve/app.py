"""`herd serve`: an OpenAI-compatible HTTP API over one loaded model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with ``stream``), GET /v1/models,
GET /health, GET /metrics (Prometheus text), and a small web chat at GET /. Every error has OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and never carries a stack trace.

Requests are checked completely (JSON, fields, images, context) before they queue; the engine
loop (scheduler.py) batches all running requests into shared decode steps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from herd.engine.batch import Job
from herd.engine.constrain import ConstraintError, json_grammar
from herd.engine.generate import Sampling
from herd.engine.prompts import Prompt
from herd.llm import LLM
from herd.serve.protocol import (ApiError, ChatChoice, ChatChunk, ChatCompletion, ChatRequest, ChunkChoice, Completion,
                                 CompletionChoice, CompletionChunk, CompletionRequest, Delta, ErrorBody, Function,
                                 Message, ModelCard, StreamedToolCall, ToolCall, Usage, GenerationRequest, brief, parse)
from herd.serve.scheduler import EngineGone, EngineProcess, QueueFull, Scheduler
from herd.images import ImageBusy, PixelBudget, map_large_buffers

log = logging.getLogger("herd.serve")
PAGE = Path(__file__).with_name("page.html")  # the web chat at /: plain HTML + JS, no build step

@dataclass
class ServeOptions:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_context: int | None = None
    max_body_bytes: int = 32 << 20
    allowed_image_dir: str | None = None  # file:// image URLs are read only below this folder
    metrics_key: str | None = None  # /metrics needs this key if set, else the API key (if set)
    # Pixels decoded at once over all requests (a 49-megapixel image costs ~300 MB while decoded);
    # beyond it an image waits up to image_wait_s, then its request gets a 503.
    image_megapixels: float = 64.0
    image_wait_s: float = 10.0
    # > 0: the engine loop runs in a forked child process with this many torch threads (CPU only:
    # CUDA does not survive a fork; see EngineProcess); 0: on a thread of this process.
    engine_process_threads: int = 0
    # Called (on the engine's thread) once the engine can run no more steps, e.g. to stop the server.
    on_engine_failure: Callable[[], None] | None = None


class Guard:
    """ASGI middleware: the API key on /v1/ routes and /metrics (compared in constant time; /metrics
    takes its own key where one is set), requests counted by endpoint and status for /metrics, and an
    OpenAI-shaped 500 instead of a stack trace (the one place that catches a route's unexpected
    exception). A client that hangs up while sending its body is counted as 499, not as an error.

    Plain ASGI rather than Starlette's ``@app.middleware("http")``, which re-streams every body
    chunk of a streaming response through a memory channel and a task switch.
    """

    COUNTED = ("/v1/chat/completions", "/v1/completions", "/v1/models")

    def __init__(self, app, api_key: str | None, counts: dict[tuple[str, int], int], metrics_key: str | None = None):
        self.app, self.api_key, self.metrics_key, self.counts = app, api_key, metrics_key, counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], None

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        key = None
        if path == "/metrics":
            key = self.metrics_key or self.api_key
        elif path.startswith("/v1/"):
            key = self.api_key
        try:
            if key is not None:
                auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), key.encode()):
                    raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                   kind="authentication_error", code="invalid_api_key")
            await self.app(scope, receive, sending)
        except ApiError as e:
            await e.response()(scope, receive, sending)
        except ClientDisconnect:  # nobody is left to answer
            log.info("client left during its request body on %s %s", scope.get("method"), path)
            status = status or 499
        except Exception:  # never a stack trace on the wire; the operator's log gets it
            log.exception("internal error on %s %s", scope.get("method"), path)
            if status is None:  # nothing sent yet
                await ApiError(500, "internal error", kind="server_error").response()(scope, receive, sending)
        finally:
            counted = (path if path in self.COUNTED else "other", status or 500)
            self.counts[counted] = self.counts.get(counted, 0) + 1


# ---- request checking -----------------------------------------------------------------------------


def generation_defaults(folder: str | Path) -> dict[str, float]:
    """Sampling defaults for requests that leave them out, from the checkpoint's generation_config.json
    (as vLLM does): temperature 0 where it says do_sample false; else its temperature, top_p and top_k;
    OpenAI's temperature 1 where it has none. A file that is not readable JSON is ignored."""
    try:
        config = json.loads((Path(folder) / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        return {"temperature": 1.0}
    if config.get("do_sample") is False:
        return {"temperature": 0.0}
    out = {"temperature": config.get("temperature", 1.0), "top_p": config.get("top_p", 1.0),
           "top_k": config.get("top_k", 0)}
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _sampling(body: GenerationRequest, defaults: Mapping[str, float]) -> Sampling:
    """The request's sampling, with the checkpoint's defaults for what it leaves out."""
    pick = lambda name, default: default if getattr(body, name) is None else getattr(body, name)  # noqa: E731
    return Sampling(temperature=float(pick("temperature", defaults.get("temperature", 1.0))),
                    top_p=float(pick("top_p", defaults.get("top_p", 1.0))),
                    top_k=int(pick("top_k", defaults.get("top_k", 0))), min_p=float(pick("min_p", 0.0)),
                    seed=None if body.seed is None else body.seed % 2**63,
                    presence_penalty=float(pick("presence_penalty", 0.0)),
                    frequency_penalty=float(pick("frequency_penalty", 0.0)),
                    repetition_penalty=float(pick("repetition_penalty", 1.0)), logit_bias=body.logit_bias)


async def _read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    if too_big and (request.headers.get("expect", "").lower() == "100-continue" or int(declared) > 4 * limit):
        # Refused before a byte is read: the server never says '100 Continue' to such a body.
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="body_too_large", headers={"Connection": "close"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        too_big = too_big or size > limit
        if too_big:
            # A client already sending (no 'Expect: 100-continue') is drained, up to 4x the limit,
            # instead of cut off: it gets a clean 413 rather than a connection reset.
            if size > 4 * limit:
                break
            chunks.clear()
            continue
        chunks.append(chunk)
    if too_big:
        raise ApiError(413, f"request body of {declared or f'over {size}'} bytes exceeds the limit of {limit} bytes",
                       code="body_too_large")
    try:
        body = json.loads(b"".join(chunks), parse_constant=_not_json)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, Python's limit on an integer's digits
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _image_parts(messages: Any, allowed_dir: str | None) -> Any:
    """Map file:// image URLs to paths (only below the allowed folder); refuse raw 'image' parts
    (a path or object the client cannot legitimately send). Other checks happen in the chat format."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping) and isinstance(m.get("content"), list):
            parts = []
            for j, part in enumerate(m["content"]):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, Mapping) and part.get("type") == "image":
                    raise ApiError(400, f"{where}: use an 'image_url' part with a data: URL", f"messages[{i}].content")
                url = part.get("image_url") if isinstance(part, Mapping) else None
                url = url.get("url") if isinstance(url, Mapping) else url
                if isinstance(url, str) and url.startswith("file://"):
                    part = {"type": "image", "image": _allowed_file(url[7:], allowed_dir, where)}
                parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out


def _allowed_file(path: str, allowed_dir: str | None, where: str) -> str:
    if allowed_dir is None:
        raise ApiError(400, f"{where}: file:// image URLs are not allowed on this server (no --allow-images-from)",
                       "messages")
    root = Path(allowed_dir).resolve()
    try:
        target = Path(path).resolve()
        inside = target.is_relative_to(root)
    except (ValueError, OSError) as e:  # a NUL byte, a name the file system refuses
        raise ApiError(400, f"{where}: not a usable file path: {_plain_os_error(e)}", "messages") from None
    if not inside:
        raise ApiError(400, f"{where}: {path!r} is outside the folder images may be read from", "messages")
    try:
        found = target.is_file()
    except (ValueError, OSError):
        found = False
    if not found:
        raise ApiError(400, f"{where}: no image file at {path[:200]!r}", "messages")
    return str(target)


def _plain_os_error(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


# ---- the app ----------------------------------------------------------------------------------------


class Inbox:
    """One request's engine events in order: (job, newly final text, whether the job ended with it)."""

    def __init__(self):
        self.items: collections.deque[tuple[Job, str, bool]] = collections.deque()
        self.ready = asyncio.Event()

    def put(self, event: tuple[Job, str, bool]) -> None:  # event loop
        self.items.append(event)
        self.ready.set()

    async def get(self) -> tuple[Job, str, bool]:
        """The next event, with that job's events already waiting right behind it merged in: a
        server that falls behind sends fewer, longer chunks instead of falling further behind."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        job, text, final = self.items.popleft()
        while not final and self.items and self.items[0][0] is job:
            _, more, final = self.items.popleft()
            text += more
        return job, text, final


@dataclass
class State:
    """What the routes share: the model, the options, the engine loop and the requests' inboxes."""

    llm: LLM
    options: ServeOptions
    defaults: dict[str, float]  # sampling defaults from the checkpoint's generation_config.json
    created: int = field(default_factory=lambda: int(time.time()))
    requests_total: dict[tuple[str, int], int] = field(default_factory=dict)
    scheduler: Scheduler | EngineProcess | None = None
    # Engine events reach the requests' inboxes in one event-loop wake-up per engine step.
    pending: collections.deque[tuple[Job, str, bool]] = field(default_factory=collections.deque)
    inboxes: dict[int, Inbox] = field(default_factory=dict)  # id(job) -> its request's inbox

    def on_event(self, job: Job, text: str) -> None:  # engine thread; a job's last event has its stop_reason set
        self.pending.append((job, text, job.stop_reason is not None))

    def deliver(self) -> None:  # event loop
        while self.pending:
            event = self.pending.popleft()
            inbox = self.inboxes.get(id(event[0]))
            if inbox is not None:
                inbox.put(event)

    def forget(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.inboxes.pop(id(job), None)


def _state(request: Request) -> State:
    return request.app.state.herd


def _body(cls: type[GenerationRequest]):
    """A dependency that reads the body within the server's limits and validates it as ``cls``."""
    async def read(request: Request) -> GenerationRequest:
        state = _state(request)
        body = await _read_json(request, state.options.max_body_bytes)
        _check_model(body, state.options.model_name)
        return parse(cls, body)
    return read


router = APIRouter()


@router.get("/", include_in_schema=False)
async def page(request: Request):
    # The page's own controls start at the server's defaults.
    settings = json.dumps({"temperature": _state(request).defaults.get("temperature", 1.0), "max_tokens": 256})
    return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{/*HERD_DEFAULTS*/}", settings))


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    gone = getattr(state.scheduler, "error", None)  # an EngineProcess whose child exited
    if gone:
        return JSONResponse({"status": "error", "model": state.options.model_name, "error": gone}, status_code=503)
    return {"status": "ok", "model": state.options.model_name}


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    return {"object": "list", "data": [ModelCard(id=state.options.model_name, created=state.created).model_dump()]}


@router.get("/v1/models/{name:path}")
async def model(request: Request, name: str):
    state = _state(request)
    if name != state.options.model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server has {state.options.model_name!r}", "model",
                       "model_not_found", kind="not_found_error")
    return ModelCard(id=name, created=state.created).model_dump()


@router.get("/metrics")
async def metrics(request: Request):
    state = _state(request)
    return PlainTextResponse(_metrics(state.scheduler, state.requests_total), media_type="text/plain; version=0.0.4")


@router.post("/v1/chat/completions")
async def chat(request: Request, body: ChatRequest = Depends(_body(ChatRequest))):
    state = _state(request)
    llm, tools = state.llm, body.tools
    forced = _forced_call_prefix(body.tool_choice, tools)
    call_schema = _strict_call_schema(body.tool_choice, tools) if tools and body.tool_choice != "none" else None
    if call_schema is not None:  # the grammar makes the reply a call in JSON (or, under auto, text); no start forced
        forced = ""
    if body.tool_choice == "none":
        tools = None
    messages = _image_parts(body.messages, state.options.allowed_image_dir)

    def encode() -> Prompt:
        prompt = llm.prepare(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                               tools=tools or None))
        if forced:  # the reply starts as a call: the model only continues it
            extra = llm.tokenizer.encode(forced)
            prompt.ids += extra
            if prompt.image_mask is not None:
                prompt.image_mask = torch.cat([prompt.image_mask, prompt.image_mask.new_zeros(len(extra))])
        return prompt

    prompt = await _prepare(encode)
    max_tokens, name = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens is not None
                        else (body.max_tokens, "max_tokens"))
    return await _complete(request, body, prompt, max_tokens, name,
                           logprobs=(body.top_logprobs or 0) if body.logprobs else None, tools=forced if tools else None,
                           call_schema=call_schema, may_answer=body.tool_choice == "auto")


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest = Depends(_body(CompletionRequest))):
    llm = _state(request).llm
    prompt = await _prepare(lambda: llm.prepare(body.prompt))
    return await _complete(request, body, prompt, 16 if body.max_tokens is None else body.max_tokens, "max_tokens",
                           logprobs=body.logprobs, tools=None)


async def _prepare(fn) -> Prompt:
    try:
        return await run_in_threadpool(fn)
    except ApiError:
        raise
    except ImageBusy as e:
        raise ApiError(503, f"{e}; retry later", kind="server_error", code="images_busy",
                       headers={"Retry-After": "2"}) from None
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise ApiError(400, str(e)[:2000] or type(e).__name__, "messages") from None
    except RecursionError:
        raise ApiError(400, "the request nests values too deeply", "messages") from None


async def _complete(request: Request, body: GenerationRequest, prompt: Prompt, max_tokens: int | None, name: str,
                    logprobs: int | None, tools: str | None, call_schema: dict | None = None,
                    may_answer: bool = False):
    """Queue the request's n jobs and answer: one body, or a stream of chunks. ``tools``: None without
    tools, else the text the reply was forced to start with ("" if none). ``call_schema``: the JSON
    schema a strict tool call must follow; ``may_answer``: or the reply is text (tool_choice auto)."""
    state = _state(request)
    scheduler, chat = state.scheduler, isinstance(body, ChatRequest)
    assert scheduler is not None
    sampling = _sampling(body, state.defaults)
    try:
        sampling.check_vocab(state.llm.config.text.vocab_size)
    except ValueError as e:
        raise ApiError(400, str(e), "logit_bias") from None
    for param, wanted, schema in (("response_format", body.response_format is not None,
                                   body.response_format and body.response_format[1]),
                                  # under auto with response_format the answer's JSON is constrained, calls are not
                                  ("tools", call_schema is not None and not (may_answer and body.response_format),
                                   call_schema)):
        if not wanted:
            continue
        try:
            grammar = json_grammar(schema, state.llm.tokenizer, state.llm.config.text.vocab_size,
                                   or_text=param == "tools" and may_answer)
        except ConstraintError as e:
            raise ApiError(400, f"'{param}': {e}", param) from None
        sampling = Sampling(**{**sampling.__dict__, "grammar": grammar})
    room = scheduler.max_len - len(prompt.ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise ApiError(400, f"the prompt has {len(prompt.ids)} tokens; with {name} {max_tokens or 1} that is more "
                       f"than the context of {scheduler.max_len} tokens", name, "context_length_exceeded")
    events = Inbox()
    jobs = []
    for i in range(body.n):
        s = sampling if sampling.seed is None else Sampling(**{**sampling.__dict__, "seed": sampling.seed + i})
        jobs.append(Job(prompt.ids, max_tokens or room, s, body.stop or (), logprobs, prompt.image_mask,
                        prompt.image_features, state.on_event))
    for job in jobs:
        state.inboxes[id(job)] = events
    try:
        scheduler.submit(jobs)
    except (QueueFull, EngineGone) as e:
        state.forget(jobs)
        if isinstance(e, EngineGone):
            raise ApiError(503, str(e), kind="server_error", code="engine_unavailable") from None
        raise ApiError(429, f"server busy: {e}; retry later", kind="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    meta = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], created=int(time.time()),
                model=state.options.model_name)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(state, jobs, events, meta, chat, tools, len(prompt.ids) if usage else None)
        return StreamingResponse(sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await _wait_all(request, jobs, events)
    finally:
        scheduler.cancel(jobs)  # no-op for finished jobs; frees the rows of a vanished client
        state.forget(jobs)
    _raise_job_error(jobs)
    usage = _usage(len(prompt.ids), jobs)
    if not chat:
        return Completion(**meta, choices=[_text_choice(state.llm, job, i) for i, job in enumerate(jobs)],
                          usage=usage).model_dump()
    choices = [_chat_choice(state.llm, job, i, tools) for i, job in enumerate(jobs)]
    for job, choice in zip(jobs, choices):
        if tools and not choice.message.tool_calls:
            raise _no_forced_call(tools, job)
    return ChatCompletion(**meta, choices=choices, usage=usage).model_dump()


async def sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """Server-sent events: one ``data:`` line per chunk, then ``[DONE]`` unless a chunk carried an error."""
    failed = False
    async for chunk in chunks:
        failed = failed or getattr(chunk, "error", None) is not None
        yield b"data: " + json.dumps(chunk.model_dump()).encode() + b"\n\n"
    if not failed:
        yield b"data: [DONE]\n\n"


async def _chunks(state: State, jobs: list[Job], events: Inbox, meta: dict, chat: bool, tools: str | None,
                  usage_prompt_tokens: int | None) -> AsyncIterator[ChatChunk | CompletionChunk]:
    """The stream's chunks as the jobs' text comes, ending with an error chunk if one fails.

    With tools, a reply streams as text once it cannot be a tool call any more; until then (and to
    its end if it may be one) its text and log-probabilities are held back."""
    llm = state.llm
    Chunk = ChatChunk if chat else CompletionChunk

    def piece(i: int, text: str, entries: list) -> ChatChunk | CompletionChunk:
        lp = None
        if entries and jobs[i].logprobs is not None:
            lp = _logprobs(llm, entries, chat, offset[i])
            offset[i] += sum(len(t) for t in lp.get("tokens", ()))
        if chat:
            return ChatChunk(**meta, choices=[ChunkChoice(index=i, delta=Delta(content=text), logprobs=lp)])
        return CompletionChunk(**meta, choices=[CompletionChoice(index=i, text=text, logprobs=lp)])

    streaming = [tools is None] * len(jobs)
    held, held_lp, sent_logprobs, offset = [""] * len(jobs), [[] for _ in jobs], [0] * len(jobs), [0] * len(jobs)
    python_start = llm.tokenizer.token_id("<|python_start|>")
    try:
        if chat:
            yield ChatChunk(**meta, choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                                             for i in range(len(jobs))])
        done = 0
        while done < len(jobs):
            job, text, final = await events.get()
            i = jobs.index(job)
            new = [e for e in job.token_logprobs[sent_logprobs[i]:] if e.token_id not in llm.tokenizer.stop_ids]
            sent_logprobs[i] = len(job.token_logprobs)
            if final and job.stop_reason == "error":
                yield Chunk(**meta, error=ErrorBody(message=job.error or "generation failed", type="server_error"))
                return
            if not streaming[i]:
                held[i] += text
                held_lp[i] += new
                if not tools and job.token_ids[:1] != [python_start] and may_be_tool_call(held[i]) is False:
                    streaming[i], text, new = True, held[i], held_lp[i]
                    held[i], held_lp[i] = "", []
            if streaming[i] and (text or new):
                yield piece(i, text, new)
            if final:
                done += 1
                if not chat:
                    reason = _text_choice(llm, job, i).finish_reason
                    yield CompletionChunk(**meta, choices=[CompletionChoice(index=i, text="", finish_reason=reason)])
                    continue
                choice = _chat_choice(llm, job, i, tools)
                delta = Delta()
                if tools is not None:
                    message = choice.message
                    if tools and not message.tool_calls:
                        yield ChatChunk(**meta, error=ErrorBody(**_no_forced_call(tools, job).body()))
                        return
                    if not streaming[i] and message.content:
                        yield piece(i, message.content, held_lp[i])
                    if message.tool_calls:
                        delta.tool_calls = [StreamedToolCall(index=k, **c.model_dump())
                                            for k, c in enumerate(message.tool_calls)]
                yield ChatChunk(**meta, choices=[ChunkChoice(index=i, delta=delta, finish_reason=choice.finish_reason)])
        if usage_prompt_tokens is not None:
            yield Chunk(**meta, usage=_usage(usage_prompt_tokens, jobs))
    finally:
        state.scheduler.cancel(jobs)  # a disconnected client frees its rows at the next step
        state.forget(jobs)


def create_app(llm: LLM, options: ServeOptions) -> FastAPI:
    state = State(llm, options, generation_defaults(llm.source))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def after_step() -> None:  # engine thread
            if state.pending:
                loop.call_soon_threadsafe(state.deliver)
            if options.on_engine_failure is not None and getattr(state.scheduler, "error", None):
                options.on_engine_failure()

        engine = EngineProcess if options.engine_process_threads else Scheduler
        extra = {"threads": options.engine_process_threads} if options.engine_process_threads else {}
        state.scheduler = engine(llm, options.max_batch, options.max_queue, options.max_context, after_step, **extra)
        if llm.tiler is not None:  # after the fork: the engine process keeps glibc's defaults
            map_large_buffers()
        try:
            yield
        finally:
            state.scheduler.close()

    app = FastAPI(title="herd", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.herd = state
    app.add_middleware(Guard, api_key=options.api_key, metrics_key=options.metrics_key, counts=state.requests_total)
    if llm.tiler is not None:  # memory for images follows this budget, not the number of threads
        llm.tiler.budget = PixelBudget(int(options.image_megapixels * 1e6), options.image_wait_s)
    app.add_exception_handler(ApiError, lambda request, e: e.response())
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError,  # FastAPI's own checks, should a route ever have some
                              lambda request, e: ApiError(400, str(e.errors()[0].get("msg", "invalid request"))).response())
    app.include_router(router)
    return app


async def _http_error(request: Request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    message = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
    return ApiError(e.status_code, message, kind=kind).response()


def _check_model(body: Mapping, name: str) -> None:
    model = body.get("model")
    if model is None:
        raise ApiError(400, "'model' is required", "model")
    if model != name:
        raise ApiError(404, f"model {brief(model)} does not exist; this server has {name!r}", "model",
                       "model_not_found", kind="not_found_error")


async def _wait_all(request: Request, jobs: list[Job], events: Inbox) -> None:
    """Until every job has ended, or at once when the client hangs up (its body is read, so the
    next ASGI message is the disconnect)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while any(job.stop_reason is None for job in jobs):
            event = asyncio.ensure_future(events.get())
            await asyncio.wait((event, gone), return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                event.cancel()
                return
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _raise_job_error(jobs: list[Job]) -> None:
    # Requests are checked against the context before they queue, so a job error is the server's.
    for job in jobs:
        if job.stop_reason == "error":
            raise ApiError(500, job.error or "generation failed", kind="server_error")


def may_be_tool_call(text: str) -> bool | None:
    """Whether a reply that starts with ``text`` may be a tool call in one of the forms Llama 4 writes
    and parse_assistant reads ([f(a=1)], a JSON object or list, <function=f>{...}): True, False, or
    None while too little has come to tell. (A reply that starts with <|python_start|> is one too.)"""
    start = text.lstrip()
    if not start:
        return None
    if start.startswith(_CALL_OPENERS):
        return True
    return None if any(opener.startswith(start) for opener in _CALL_OPENERS) else False


_CALL_OPENERS = ("[", "{", "<function=")


def _no_forced_call(forced: str, job: Job) -> ApiError:
    """tool_choice forced a call, and the reply is not one that parses: the client is told (422),
    never handed the forced start as content."""
    return ApiError(422, f"tool_choice forced a tool call, but the model's reply does not parse as one: "
                    f"{(forced + job.text)[:200]!r}", "tool_choice", "tool_call_not_parsed", kind="server_error")


def _finish_reason(job: Job, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if job.stop_reason == "length" else "stop"


def _strict_call_schema(choice: Any, tools: list) -> dict | None:
    """For tools that are all ``strict`` (of them, the one tool_choice names): the JSON schema of a
    call, {"name": ..., "parameters": ...} (Llama 4's JSON call form), one branch per function; else None."""
    functions = [t.get("function") for t in tools if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)]
    if isinstance(choice, Mapping):
        named = choice.get("function")
        functions = [f for f in functions if isinstance(named, Mapping) and f.get("name") == named.get("name")]
    if not functions or not all(f.get("strict") is True and isinstance(f.get("name"), str) for f in functions):
        return None
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "parameters": f.get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _forced_call_prefix(choice: Any, tools: Any) -> str:
    """What a reply must start with for tool_choice: '' (auto / none), '[' (required: some call, in
    the Python-list form the tools prompt asks for), '[name(' (that function)."""
    if choice in ("auto", "none"):
        return ""
    if choice == "required" or isinstance(choice, Mapping):
        if not tools:
            raise ApiError(400, f"tool_choice {brief(choice)} needs 'tools'", "tool_choice")
        if choice == "required":
            return "["
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), Mapping) else None
        names = [t.get("function", {}).get("name") for t in tools if isinstance(t.get("function"), Mapping)]
        if choice.get("type", "function") != "function" or name not in names:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not among the tools {names}",
                           "tool_choice")
        return f"[{name}("
    raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}", "tool_choice")


def _text_choice(llm: LLM, job: Job, index: int) -> CompletionChoice:
    lp = _logprobs(llm, job.token_logprobs, False) if job.logprobs is not None else None
    return CompletionChoice(index=index, text=job.text, logprobs=lp, finish_reason=_finish_reason(job, False))


def _chat_choice(llm: LLM, job: Job, index: int, tools: str | None) -> ChatChoice:
    lp = _logprobs(llm, job.token_logprobs, True) if job.logprobs is not None else None
    calls = ()
    if tools is not None:  # a forced start is part of the reply
        try:
            calls = llm.tokenizer.parse_assistant(llm.tokenizer.encode(tools) + job.token_ids).tool_calls
        except Exception:  # a parser failure on one reply leaves it as text, never fails its neighbours
            log.warning("tool-call parsing failed on a reply; returned as text", exc_info=True)
    if calls:
        message = Message(content=None, tool_calls=[
            ToolCall(id=c.call_id or "call_" + uuid.uuid4().hex[:24],
                     function=Function(name=c.name, arguments=json.dumps(c.arguments))) for c in calls])
    else:
        message = Message(content=(tools or "") + job.text)
    return ChatChoice(index=index, message=message, logprobs=lp, finish_reason=_finish_reason(job, bool(calls)))


def _usage(prompt_tokens: int, jobs: list[Job]) -> Usage:
    completion = sum(len(j.token_ids) for j in jobs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _token(llm: LLM, token_id: int) -> tuple[str, list[int]]:
    raw = llm.tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _logprobs(llm: LLM, entries, chat: bool, offset: int = 0) -> dict:
    """OpenAI's logprobs of the reply's tokens (the stop token that ended it is no part of the reply);
    completions' text_offset counts characters from ``offset``, the reply's text before these tokens."""
    entries = [e for e in entries if e.token_id not in llm.tokenizer.stop_ids]
    if chat:
        content = []
        for e in entries:
            text, raw = _token(llm, e.token_id)
            top = [{"token": t_text, "logprob": lp, "bytes": t_raw}
                   for (t_text, t_raw), lp in ((_token(llm, t), lp) for t, lp in e.top)]
            content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content}
    tokens = [_token(llm, e.token_id)[0] for e in entries]
    starts = list(itertools.accumulate((len(t) for t in tokens), initial=offset))[:-1]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token(llm, t)[0]: lp for t, lp in e.top} for e in entries], "text_offset": starts}


def _metrics(scheduler: Scheduler | EngineProcess | None, requests_total: dict[tuple[str, int], int]) -> str:
    lines = ["# HELP herd_requests_total HTTP requests by endpoint and status.", "# TYPE herd_requests_total counter"]
    lines += [f'herd_requests_total{{endpoint="{p}",status="{s}"}} {n}' for (p, s), n in sorted(requests_total.items())]
    if scheduler is not None:
        st = scheduler.stats
        for name, kind, value, help_ in (
                ("herd_prompt_tokens_total", "counter", st.prompt_tokens, "Prompt tokens prefilled."),
                ("herd_generation_tokens_total", "counter", st.generated_tokens, "Tokens generated."),
                ("herd_requests_finished_total", "counter", st.finished, "Sequences finished."),
                ("herd_queue_depth", "gauge", scheduler.queue_depth, "Sequences waiting for a batch row."),
                ("herd_running", "gauge", scheduler.running, "Sequences in the running batch."),
                ("herd_time_to_first_token_seconds_sum", "counter", st.ttft_sum, "Queue + prefill time, summed."),
                ("herd_time_to_first_token_seconds_count", "counter", st.ttft_count, "Sequences with a first token."),
                ("herd_decode_tokens_per_second", "gauge", st.decode_tokens_per_s, "Tokens/s of the last step."),
                ("herd_draft_tokens_total", "counter", st.draft_tokens, "Prompt-lookup draft tokens verified."),
                ("herd_draft_tokens_kept_total", "counter", st.draft_tokens_kept, "Draft tokens kept."),
                ("herd_prefix_cache_lookups_total", "counter", st.prefix_lookups, "Prompts looked up."),
                ("herd_prefix_cache_hits_total", "counter", st.prefix_hits, "Prompts that reused a prefix."),
                ("herd_prefix_cache_reused_tokens_total", "counter", st.prefix_reused_tokens, "Prompt tokens reused."),
                ("herd_prefix_cache_bytes", "gauge", st.prefix_cache_bytes, "Bytes the prefix cache holds.")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
