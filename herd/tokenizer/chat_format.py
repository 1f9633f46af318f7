"""OpenAI-style chat messages -> Llama 4 prompt ids, and generated ids -> an assistant message.

Prompt layout (Meta's llama_models/llama4/chat_format.py ChatFormat is the ground truth):

    <|begin_of_text|>
    <|header_start|>{role}<|header_end|>\\n\\n{content}{tool calls}<|eot|> or <|eom|>   per message
    <|header_start|>assistant<|header_end|>\\n\\n                                        generation prompt

The OpenAI role "tool" is written as "ipython". Like the reference, a message ends with <|eom|>
("waiting for a tool result") when it is a tool result or an assistant turn that made tool calls,
and with <|eot|> otherwise. Every text piece (role name, "\\n\\n", each content part, each tool
call) is tokenized separately, as the reference does: BPE never merges across those seams.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from herd.tokenizer.tokenizer import Tokenizer

StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
ToolFormat = Literal["json", "python_list"]

_HEADER_ROLE = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython",
                "developer": "system"}
_SAME_ROLE = {"ipython": "tool", "developer": "system"}  # other names for a role: Meta's, OpenAI's newer one
# Meta renders these tool names in its builtin syntax (llama3/tool_utils.py ToolUtils.encode_tool_call),
# keyed by the argument the syntax carries.
_BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
_BUILTIN_CALL = re.compile(r'\b(\w+)\.call\(query="([^"]*)"\)')
_FUNCTION_TAG = re.compile(r"<function=([^>]+)>(.*?)</function>", re.DOTALL)
_PY_START, _PY_END = "<|python_start|>", "<|python_end|>"


@dataclass(frozen=True)
class ToolCall:
    """One function call: its name, its arguments as a dict, and the id that ties the result to it."""

    name: str
    arguments: dict[str, Any]
    call_id: str = ""


@dataclass(frozen=True)
class ImagePart:
    """An image content part as the user gave it (PIL image, path, bytes or data: URL), not yet decoded."""

    image: Any
    index: int  # position among the prompt's images, for error messages


@dataclass(frozen=True)
class ChatMessage:
    """A validated message: header role and its content parts in order, plus an assistant's tool calls."""

    role: Literal["system", "user", "assistant", "tool"]
    parts: tuple[str | ImagePart, ...]
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(p for p in self.parts if isinstance(p, str))


class ImageProcessor(Protocol):
    """What the chat format needs from the vision side: tiles for an image and the patch tokens per tile."""

    tokens_per_tile: int

    def __call__(self, image: Any, index: int) -> tuple[torch.Tensor, tuple[int, int]]: ...


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation's prompt: token ids and the tiles of its images.

    ``pixel_values`` is float32 [tiles, 3, S, S] in prompt order (None without images) and
    ``image_grids`` the (rows, cols) of each image; pass them to ``llm.logits(..., pixel_values=)``,
    or the whole prompt to ``llm.generate``. ``assistant_mask`` is True for the tokens the assistant
    wrote (its messages' content, tool calls and end token, not their headers): what fine-tuning learns.
    """

    ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grids: tuple[tuple[int, int], ...] = ()
    assistant_mask: tuple[bool, ...] = ()


@dataclass(frozen=True)
class AssistantMessage:
    """What the model said: text, why it stopped, and the tool calls it made (content '' then, as Meta)."""

    content: str
    stop_reason: StopReason
    tool_calls: tuple[ToolCall, ...] = field(default_factory=tuple)


# ---- messages in ----------------------------------------------------------------------------


def parse_messages(messages: Sequence[Mapping[str, Any]]) -> list[ChatMessage]:
    """Validate OpenAI-style message dicts; errors name the message index and the field."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages: expected a list of message dicts, got {type(messages).__name__}")
    out: list[ChatMessage] = []
    n_images = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role not in _HEADER_ROLE:
            raise ValueError(f"{where}.role: unknown role {str(role)[:40]!r}; expected system (or developer), user, "
                             "assistant or tool")
        role = _SAME_ROLE.get(role, role)
        calls = _parse_tool_calls(m.get("tool_calls"), where) if role == "assistant" else ()
        # OpenAI sends content null on assistant turns that only call tools.
        parts = _parse_content(m.get("content"), f"{where}.content", allow_none=role == "assistant",
                               first_image=n_images)
        n_images += sum(isinstance(p, ImagePart) for p in parts)
        out.append(ChatMessage(role, parts, calls))
    return out


def _parse_content(content: Any, where: str, allow_none: bool, first_image: int = 0) -> tuple[str | ImagePart, ...]:
    if isinstance(content, str):
        return (content,)
    if content is None and allow_none:
        return ()
    if not isinstance(content, list):
        raise ValueError(f"{where}: expected a string or a list of content parts, got {type(content).__name__}")
    parts: list[str | ImagePart] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}].text: expected a string, got {type(part.get('text')).__name__}")
            parts.append(part["text"])
        elif kind in ("image_url", "image"):
            index = first_image + sum(isinstance(p, ImagePart) for p in parts)
            parts.append(ImagePart(_image_of(part, kind, f"{where}[{j}]", index), index))
        else:
            got = kind if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"{where}[{j}]: expected a content part of type 'text', 'image_url' or 'image', "
                             f"got {got!r}")
    return tuple(parts)


def _image_of(part: Mapping, kind: str, where: str, index: int) -> Any:
    """The image a content part refers to; URLs other than data: are refused (herd never fetches)."""
    if kind == "image":
        if part.get("image") is None:
            raise ValueError(f"{where}.image (image {index}): missing; give a PIL image, a path or bytes")
        return part["image"]
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, Mapping) else spec
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}.image_url (image {index}): expected {{'url': 'data:image/...;base64,...'}}")
    if url.startswith(("http://", "https://")):
        raise ValueError(f"{where}.image_url (image {index}): remote URLs are not fetched; send the image as a "
                         f"data: URL (base64) instead")
    if not url.startswith("data:"):
        raise ValueError(f"{where}.image_url (image {index}): expected a data: URL, got {url[:40]!r}")
    return url


def _parse_tool_calls(calls: Any, where: str) -> tuple[ToolCall, ...]:
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise ValueError(f"{where}.tool_calls: expected a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or call.get("type", "function") != "function":
            raise ValueError(f"{at}: expected {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{at}.function.name: expected a non-empty string, got {fn.get('name')!r}")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):  # OpenAI's wire form: a JSON string
            try:
                args = json.loads(args or "{}")
            except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
                raise ValueError(f"{at}.function.arguments: not valid JSON ({e})") from None
            except RecursionError:
                raise ValueError(f"{at}.function.arguments: JSON nested too deeply") from None
        if not isinstance(args, dict):
            raise ValueError(f"{at}.function.arguments: expected a JSON object, got {type(args).__name__}")
        out.append(ToolCall(fn["name"], args, str(call.get("id") or "")))
    return tuple(out)


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """System-prompt text that offers OpenAI-style tool definitions to the model (herd's own wording)."""
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        functions.append(dict(fn))
    # Llama 4 was post-trained to answer with a Python list of calls (Meta's llama-stack asks for that
    # form), so the instructions ask for it; parse_assistant also accepts the JSON forms.
    return ("You may call the functions whose definitions follow (as JSON). To call any of them, answer with "
            "nothing but a Python list of calls that use keyword arguments, for example "
            "[func_a(x=1, y=\"two\"), func_b(z=[3])]. Otherwise answer in plain text.\n\n"
            + json.dumps(functions, indent=2, ensure_ascii=False))


# ---- encoding -------------------------------------------------------------------------------


def render_tool_call(call: ToolCall, tool_format: ToolFormat = "json") -> str:
    """The text an assistant tool call is written as in the prompt (Meta's ToolUtils.encode_tool_call)."""
    if call.name in _BUILTIN_QUERY_TOOLS and "query" in call.arguments:
        return f'{call.name}.call(query="{call.arguments["query"]}")'
    if call.name == "code_interpreter" and "code" in call.arguments:
        return str(call.arguments["code"])
    if tool_format == "json":
        # Default separators and ASCII escapes, as json.dumps in the reference.
        return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})
    if tool_format == "python_list":
        return f"[{call.name}({', '.join(f'{k}={_py_value(v)}' for k, v in call.arguments.items())})]"
    raise ValueError(f"tool_format must be 'json' or 'python_list', got {tool_format!r}")


def _py_value(v: Any) -> str:
    # Same text as Meta's format_value wherever that is valid Python; strings with quotes or
    # newlines are escaped and dicts written as dict literals, where Meta's text would not parse.
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (bool, int, float)) or v is None:
        return str(v)
    if isinstance(v, list):
        return f"[{', '.join(_py_value(x) for x in v)}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {_py_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"tool call argument of type {type(v).__name__} cannot be written as Python")


def encode_header(tokenizer: Tokenizer, role: str) -> list[int]:
    """<|header_start|>{role}<|header_end|>\\n\\n, with tool written as ipython."""
    return [tokenizer.token_id("<|header_start|>"), *tokenizer.encode(_HEADER_ROLE[role]),
            tokenizer.token_id("<|header_end|>"), *tokenizer.encode("\n\n")]


def image_tokens(tokenizer: Tokenizer, grid: tuple[int, int], tokens_per_tile: int) -> list[int]:
    """One image's token layout (SPEC §3): <|patch|>×N per tile with x/y separators, then the thumbnail."""
    special = tokenizer.token_id
    patches = [special("<|patch|>")] * tokens_per_tile
    rows, cols = grid
    ids = [special("<|image_start|>")]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                ids += patches
                if c < cols - 1:
                    ids.append(special("<|tile_x_separator|>"))
            ids.append(special("<|tile_y_separator|>"))
    return ids + [special("<|image|>"), *patches, special("<|image_end|>")]


def encode_message(tokenizer: Tokenizer, message: ChatMessage, tool_format: ToolFormat = "json",
                   images: dict[int, tuple[torch.Tensor, tuple[int, int]]] | None = None,
                   tokens_per_tile: int = 0) -> list[int]:
    """One message's ids, header to end token, as Meta's ChatFormat.encode_message; ``images`` maps an
    image index to its (tiles, grid), whose tokens go where the image part stands."""
    ids = encode_header(tokenizer, message.role)
    for part in message.parts:
        if isinstance(part, str):
            ids += tokenizer.encode(part)
        else:
            ids += image_tokens(tokenizer, images[part.index][1], tokens_per_tile)
    for call in message.tool_calls:
        ids += tokenizer.encode(render_tool_call(call, tool_format))
    waits_for_tool = message.role == "tool" or bool(message.tool_calls)
    ids.append(tokenizer.eom_id if waits_for_tool else tokenizer.eot_id)
    return ids


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                tools: Sequence[Mapping[str, Any]] | None = None, tool_format: ToolFormat = "json",
                image_processor: ImageProcessor | None = None, max_images: int | None = None,
                no_images_reason: str = "this model has no vision encoder (a text-only checkpoint)") -> ChatPrompt:
    """Prompt ids for a conversation: one <|begin_of_text|>, every message, then the assistant header.

    Images in the messages are decoded and tiled (all of them, before anything else is returned),
    their tiles carried on the result as ``pixel_values``.
    """
    parsed = parse_messages(messages)
    if tool_format not in ("json", "python_list"):
        raise ValueError(f"tool_format must be 'json' or 'python_list', got {tool_format!r}")
    parts = [p for m in parsed for p in m.parts if isinstance(p, ImagePart)]
    if parts and image_processor is None:
        raise ValueError(f"image {parts[0].index}: {no_images_reason}, so the prompt cannot carry images")
    if max_images is not None and len(parts) > max_images:
        raise ValueError(f"image {max_images}: the prompt has {len(parts)} images, more than the limit of "
                         f"{max_images} per prompt")
    images = {p.index: image_processor(p.image, p.index) for p in parts}
    if tools:
        offer = tools_prompt(tools)
        if parsed and parsed[0].role == "system":
            first = parsed[0]
            texts = (*first.parts, "\n\n" + offer) if "".join(first.texts) else (offer,)
            parsed[0] = ChatMessage("system", texts)
        else:
            parsed.insert(0, ChatMessage("system", (offer,)))
    ids = [tokenizer.bos_id]
    mask = [False]
    per_tile = image_processor.tokens_per_tile if image_processor is not None else 0
    for message in parsed:
        m_ids = encode_message(tokenizer, message, tool_format, images, per_tile)
        header = len(encode_header(tokenizer, message.role))
        ids += m_ids
        mask += [False] * header + [message.role == "assistant"] * (len(m_ids) - header)
    if add_generation_prompt:
        ids += encode_header(tokenizer, "assistant")
        mask += [False] * (len(ids) - len(mask))
    tiles = [images[p.index][0] for p in parts]
    pixels = torch.cat(tiles) if tiles and tiles[0] is not None else None  # None: a layout-only processor
    return ChatPrompt(ids, pixels, tuple(images[p.index][1] for p in parts), tuple(mask))


# ---- generated ids out ----------------------------------------------------------------------


def parse_assistant(tokenizer: Tokenizer, token_ids: Sequence[int]) -> AssistantMessage:
    """Generated ids (stop token included if there was one) -> AssistantMessage, as Meta's decoder reads them."""
    # Work on the decoded text with special tokens spelled out, in the reference's order, so that
    # spaces and tags are trimmed exactly as Meta's decode_assistant_message_from_content does.
    text = tokenizer.decode(token_ids).strip(" ")
    header = "<|header_start|>assistant<|header_end|>\n\n"
    if text.startswith(header):
        text = text[len(header):]
    stop_reason: StopReason = "out_of_tokens"
    # <|end_of_text|> is also a stop id; the reference leaves it in the text, we read it as end of turn.
    for tag, reason in (("<|eot|>", "end_of_turn"), ("<|eom|>", "end_of_message"), ("<|end_of_text|>", "end_of_turn")):
        if text.endswith(tag):
            text, stop_reason = text[:-len(tag)], reason
            break
    # The reference only knows <|python_start|> at the very start; text before it is kept as content.
    prefix, python, body = text.partition(_PY_START)
    if python:
        body = body.replace(_PY_END, "")
    else:
        prefix, body = "", text
    calls = parse_tool_calls(body)
    if calls:
        return AssistantMessage(prefix.strip(), stop_reason, calls)
    if python:  # code the model wants run, as Meta's fallback to its code_interpreter tool
        return AssistantMessage(prefix.strip(), stop_reason, (ToolCall("code_interpreter", {"code": body}, _new_id()),))
    return AssistantMessage(text, stop_reason)


def parse_tool_calls(text: str) -> tuple[ToolCall, ...]:
    """Tool calls in generated text: <function=f>{json}</function>, JSON object(s), [f(a=1)], or f.call(query="..")."""
    body = text.strip()
    for parse in (_function_tag_calls, _json_calls, _python_list_calls):
        calls = parse(body)
        if calls:
            return tuple(ToolCall(name, args, _new_id()) for name, args in calls)
    builtin = _BUILTIN_CALL.search(body)  # searched anywhere, as the reference does
    if builtin:
        return (ToolCall(builtin.group(1), {"query": builtin.group(2)}, _new_id()),)
    return ()


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _json_or_none(text: str) -> Any:
    """Generated text as JSON, or None where it is not (bad syntax, too deep, digits past Python's limit)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _function_tag_calls(body: str) -> list[tuple[str, dict]]:
    calls = []
    for name, args in _FUNCTION_TAG.findall(body):
        parsed = _json_or_none(args)
        if not isinstance(parsed, dict):
            return []
        calls.append((name.strip(), parsed))
    return calls


def _json_calls(body: str) -> list[tuple[str, dict]]:
    if not body.startswith(("{", "[")):
        return []
    value = _json_or_none(body)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return []
        if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}} (OpenAI's shape)
            item = item["function"]
        args = item.get("parameters", item.get("arguments"))
        if isinstance(args, str):
            args = _json_or_none(args)
        if not isinstance(item.get("name"), str) or not isinstance(args, dict):
            return []
        calls.append((item["name"], args))
    return calls


def _python_list_calls(body: str) -> list[tuple[str, dict]]:
    # ast only reads the syntax tree and literal_eval only builds literals: nothing is executed.
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # nesting past the parser's limits too
        return []
    if not isinstance(tree, ast.List) or not tree.elts:
        return []
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return []
        name = _dotted_name(node.func)
        if name is None:
            return []
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return []  # a variable or an expression as argument: not a call we can pass on
        calls.append((name, args))
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


class ChatTokenizer(Tokenizer):
    """A Tokenizer that also speaks Llama 4's chat format (what ``llm.tokenizer`` is), with the image
    processor and limits of the model it belongs to."""

    image_processor: ImageProcessor | None = None
    max_images: int | None = None
    no_images_reason = "this model has no vision encoder (a text-only checkpoint)"  # said when images are given

    @classmethod
    def of(cls, tokenizer: Tokenizer, image_processor: ImageProcessor | None = None, max_images: int | None = None,
           no_images_reason: str | None = None) -> ChatTokenizer:
        """A chat tokenizer sharing ``tokenizer``'s tables (they are never changed)."""
        chat = cls.__new__(cls)
        chat.__dict__.update(vars(tokenizer))
        chat.image_processor, chat.max_images = image_processor, max_images
        if no_images_reason is not None:
            chat.no_images_reason = no_images_reason
        return chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, tool_format: str = "json") -> ChatPrompt:
        """OpenAI-style messages -> a ChatPrompt (ids with one <|begin_of_text|>, as Meta's ChatFormat
        encodes them, and the images' tiles); images need a vision checkpoint's tokenizer."""
        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           tool_format=tool_format, image_processor=self.image_processor,
                           max_images=self.max_images, no_images_reason=self.no_images_reason)

    def parse_assistant(self, ids: Sequence[int]) -> AssistantMessage:
        """Generated ids -> AssistantMessage(content, stop_reason, tool_calls)."""
        return parse_assistant(self, ids)
