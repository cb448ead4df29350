"""Where the prompt-file format and its LLM client were imported from before they were split:
the format is prompt_format.py, the client llm_client.py. New code imports those; this module
only names them again for code that still imports from here."""

from __future__ import annotations

from .llm_client import MAX_ANSWER_BYTES, GenerationError, chat_url, generate
from .prompt_format import (FORMAT, MAX_CHARS, MAX_FILE_BYTES, STATES, VERSION, PromptFileError,
                            category_problems, expand, load, parse_answer, read_prompt_file,
                            validate)

__all__ = ["FORMAT", "MAX_ANSWER_BYTES", "MAX_CHARS", "MAX_FILE_BYTES", "STATES", "VERSION",
           "GenerationError", "PromptFileError", "category_problems", "chat_url", "expand",
           "generate", "load", "parse_answer", "read_prompt_file", "validate"]
