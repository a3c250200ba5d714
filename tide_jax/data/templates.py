"""Chat templates: the built-in ones, and rendering any template as `transformers` renders it.

Built-in templates (used by the built-in tokenizer specs of `tokenizers.py`):

- `QWEN3_TEMPLATE`: the Qwen3 chat format for system/user/assistant conversations, with
  thinking disabled unless `enable_thinking=True` is passed: the final assistant answer
  (an answer after the last user message) is preceded by an empty think block
  `<think>\\n\\n</think>\\n\\n`, earlier answers are not, and the generation prompt ends in the
  same empty think block. On such conversations it renders exactly what Qwen3's own template
  renders with `enable_thinking=False` (tests/test_data_templates.py checks this against the
  template published with Qwen3-0.6B). Tools and reasoning traces are not supported.
- `CHATML_TEMPLATE`: plain ChatML without think blocks (the Qwen3.5 tokenizer's default).
- `LLAMA3_TEMPLATE`: Llama-3 instruct: BOS once, a header per turn, content trimmed.

`render` applies a template in the environment `transformers` compiles chat templates in
(its sandbox, filters, globals and `{% generation %}` tag), so a folder's official template
renders here exactly as `tokenizer.apply_chat_template` renders it.
"""

from __future__ import annotations

import jinja2
from transformers.utils import chat_template_utils

QWEN3_TEMPLATE = (
    # Index of the last real user query; answers after it are the "current" turn. Without
    # one, no answer gets a think block.
    "{%- set ns = namespace(query=messages | length - 1, seen=false) -%}"
    "{%- for m in messages | reverse -%}"
    "{%- if not ns.seen and m.role == 'user' and m.content is string"
    " and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) -%}"
    "{%- set ns.query = messages | length - 1 - loop.index0 -%}{%- set ns.seen = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set answer = m.content -%}{%- set thought = '' -%}"
    "{%- if '</think>' in answer -%}"
    "{%- set thought = answer.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set answer = answer.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.query and (loop.last or thought) -%}"
    "{{- '<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + answer.lstrip('\\n') -}}"
    "{%- else -%}{{- answer -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is not defined or enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# ChatML without think blocks; `content` verbatim.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama-3 instruct template: BOS once, header per turn, content trimmed, <|eot_id|> after each.
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


class TemplateError(ValueError):
  """A chat template that cannot render a conversation, or renders its content altered."""

  kind = "template_error"


def render(
    tokenizer,
    messages: list[dict],
    generation_prompt: bool = False,
    template_args: dict | None = None,
) -> str:
  """The tokenizer's chat template applied to `messages`.

  Args:
    tokenizer: a `transformers` tokenizer with a chat template.
    messages: [{"role", "content"}, ...].
    generation_prompt: append the template's opening of an assistant turn.
    template_args: extra template variables (e.g. {"enable_thinking": False}).

  Raises:
    TemplateError: the template refused or failed to render the conversation.
  """
  # Same variables as `apply_chat_template`: the special tokens, then the caller's arguments.
  variables = {
      key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)
  }
  variables.update(template_args or {})
  # The environment transformers compiles chat templates in (cached by template text).
  compiled = chat_template_utils._compile_jinja_template(tokenizer.chat_template)
  try:
    return compiled.render(messages=messages, add_generation_prompt=generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as err:
    raise TemplateError(f"the chat template refused the conversation: {err}") from err
  except Exception as err:  # e.g. a template that indexes a message the conversation lacks
    raise TemplateError(f"the chat template failed to render the conversation: {err}") from err
