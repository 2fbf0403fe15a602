"""A chat answer's text as tool calls, per tool_choice (pagewire.tools.calls): whole for a
non-streamed answer, as OpenAI's tool-call deltas for a streamed one. Streamed deltas
reassemble (content joined, each call's arguments joined by index) to the whole answer."""

from __future__ import annotations

from pagewire.tools.calls import ToolCall, ToolChoice, required_calls
from pagewire.tools.parsers import StreamingParser, parser_named


class ToolOutput:
    def __init__(self, choice: ToolChoice, parser: str):
        self.choice = choice
        self.parser = parser

    def calls_in(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole answer."""
        if self.choice.mode == "named":  # the text is the function's arguments
            return "", [ToolCall(self.choice.function, text)]
        if self.choice.mode == "required":
            try:
                return "", required_calls(text)
            except (ValueError, KeyError, TypeError):  # cut short by max_tokens
                return text, []
        parsed = parser_named(self.parser)(text)
        return parsed.content, parsed.calls

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        content, calls = self.calls_in(text)
        message = {"role": "assistant", "content": _content(content, calls)}
        if calls:
            message["tool_calls"] = [call.as_dict() for call in calls]
        return message, _finish(finish_reason, calls)

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One choice's streamed deltas."""

    def __init__(self, output: ToolOutput):
        self._output = output
        self._mode = output.choice.mode
        self._parser = StreamingParser(output.parser) if self._mode == "auto" else None
        self._named_call: ToolCall | None = None
        self._buffer = ""

    def deltas(self, text: str, finish_reason: str | None) -> list[tuple[dict, str | None]]:
        """(delta, finish_reason) pairs to send for one event's text; the finish reason goes
        on the last pair of the choice's last event."""
        out: list[dict] = []
        calls: list[ToolCall] = []
        if self._mode == "named":
            if self._named_call is None:
                self._named_call = ToolCall(self._output.choice.function, "")
                out.append({"tool_calls": [{"index": 0, **self._named_call.as_dict()}]})
                out[0]["tool_calls"][0]["function"]["arguments"] = text
            elif text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            calls = [self._named_call]
        elif self._mode == "required":
            self._buffer += text
            if finish_reason is not None:
                content, calls = self._output.calls_in(self._buffer)
                if content:
                    out.append({"content": content})
        else:
            content = self._parser.feed(text)
            if content:
                out.append({"content": content})
            if finish_reason is not None:
                end = self._parser.finish()
                calls = end.calls
                # whitespace alone before the calls is no content (as in the whole answer)
                if end.content and (self._parser.spoke or end.content.strip() or not calls):
                    out.append({"content": end.content})
        if finish_reason is not None and calls and self._mode != "named":
            out.append({"tool_calls": [{"index": i, **call.as_dict()}
                                       for i, call in enumerate(calls)]})
        if finish_reason is None:
            return [(delta, None) for delta in out]
        if not out:
            out.append({})
        return [(delta, None) for delta in out[:-1]] + [(out[-1], _finish(finish_reason,
                                                                           calls))]


def _content(content: str, calls: list[ToolCall]) -> str | None:
    return None if calls and not content.strip() else content


def _finish(finish_reason: str | None, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason
