"""Llama 4 tokenizer (tiktoken or tokenizer.json backends, identical ids) and chat format."""

from herd.tokenizer.chat_format import (AssistantMessage, ChatMessage, ToolCall, encode_chat, parse_assistant,
                                        parse_messages, parse_tool_calls)
from herd.tokenizer.tokenizer import StreamDecoder, Tokenizer, TokenizerError

__all__ = ["AssistantMessage", "ChatMessage", "StreamDecoder", "ToolCall", "Tokenizer", "TokenizerError",
           "encode_chat", "parse_assistant", "parse_messages", "parse_tool_calls"]
