"""Llama 4 tokenizer (tiktoken or tokenizer.json backends, identical ids) and chat format."""

from herd.tokenizer.chat_format import (AssistantMessage, ChatMessage, ChatPrompt, ChatTokenizer, ToolCall, encode_chat,
                                        parse_assistant, parse_messages, parse_tool_calls)
from herd.tokenizer.tokenizer import StreamDecoder, Tokenizer, TokenizerError

__all__ = ["AssistantMessage", "ChatMessage", "ChatPrompt", "ChatTokenizer", "StreamDecoder", "ToolCall", "Tokenizer", "TokenizerError",
           "encode_chat", "parse_assistant", "parse_messages", "parse_tool_calls"]
