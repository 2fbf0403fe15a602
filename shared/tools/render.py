"""Chat messages with tools, ready for a chat template.

A template that knows tools (it mentions them: Qwen, Llama 3.1, Hermes, Mistral's) gets them as
transformers' `apply_chat_template(..., tools=...)` expects: the tools list, and assistant tool
calls with their arguments as objects. A template that does not (the embedded SmolLM2's) gets
them written into the conversation in the Hermes format instead, which the `hermes` parser
reads back: the tools and how to call them in the system prompt, earlier calls as
<tool_call> blocks in the assistant's turn, tool results as <tool_response> blocks.
Pure: no tokenizer, no I/O.
"""

from __future__ import annotations

import json

TOOL_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user "
    "query. Don't make assumptions about what values to plug into functions. Here are the "
    "available tools: <tools>\n{tools}\n</tools>\nFor each function call, return a JSON object "
    "with the function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (vLLM's test: it mentions them)."""
    return bool(template) and "tools" in template


def for_template(messages: list[dict], tools: list[dict] | None,
                 knows_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to hand to apply_chat_template. Messages are OpenAI's: role, content
    (text or None), and optionally name, tool_call_id and tool_calls (arguments as JSON)."""
    if knows_tools:
        return [_with_argument_objects(m) for m in messages], tools or None
    rendered = [_written_out(m) for m in messages]
    if tools:
        prompt = TOOL_PROMPT.format(tools="\n".join(
            json.dumps(t["function"], ensure_ascii=False) for t in tools))
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{prompt}"}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered, None


def _with_argument_objects(message: dict) -> dict:
    out = {k: v for k, v in message.items() if v is not None}
    if message.get("tool_calls"):
        out["tool_calls"] = [{**call, "function": {
            **call["function"], "arguments": _loads(call["function"]["arguments"])}}
            for call in message["tool_calls"]]
    out.setdefault("content", "")
    return out


def _written_out(message: dict) -> dict:
    content = message.get("content") or ""
    if message.get("tool_calls"):
        content += "".join(
            "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                          "arguments": _loads(c["function"]["arguments"])},
                                         ensure_ascii=False) + "\n</tool_call>"
            for c in message["tool_calls"])
    if message["role"] == "tool":
        content = f"<tool_response>\n{content}\n</tool_response>"
    return {"role": message["role"], "content": content}


def _loads(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments  # not JSON: passed on as written
