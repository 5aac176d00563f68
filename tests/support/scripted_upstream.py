"""A scripted OpenAI-compatible upstream, for what a random-weight model cannot be made to do.

Why a fake: the real llama-server with the tiny model makes schema-valid tool calls only when
the test controls the prompt (an assistant prefill). Claude Code controls its own prompt, so a
full Claude Code tool round trip (model asks for Bash, Claude Code runs it, model answers) needs
an upstream that answers the first turn with a Bash call and the second with text. This server
does exactly that, streaming in the same chunk shapes llama-server uses (role chunk, one
`tool_calls` chunk with id and name, argument fragments, finish chunk with `timings`, usage
chunk, `[DONE]`). Everything else in the test suite runs against the real llama-server.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.support.local_http import LocalServer, QuietHandler


class ScriptedUpstream(LocalServer):
    def __init__(self, command: str = "true", can_render: bool = True):
        self.command = command
        self.can_render = can_render  # False: no /apply-template, like a non-llama.cpp server
        self.requests: list[dict[str, Any]] = []
        super().__init__(self._handler())

    def _reply(self, body: dict) -> list[dict]:
        """The chunks answering one chat-completion request."""
        messages = body.get("messages", [])
        base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": int(time.time()), "model": "scripted"}
        chunks: list[dict] = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}])]
        if messages and messages[-1].get("role") == "tool" and body.get("tools"):
            output = str(messages[-1].get("content", "")).strip().splitlines()
            text = f"The command printed: {output[0] if output else '(nothing)'}"
            for piece in (text[:10], text[10:]):
                chunks.append(dict(base, choices=[{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
            finish = "stop"
        elif body.get("tools"):
            arguments = json.dumps({"command": self.command, "description": "run the scripted command"})
            chunks.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_scripted1", "type": "function", "function": {"name": "Bash", "arguments": ""}}]}, "finish_reason": None}]))
            for i in range(0, len(arguments), 12):
                chunks.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": arguments[i:i + 12]}}]}, "finish_reason": None}]))
            finish = "tool_calls"
        else:
            # Background requests (titles and the like): a short JSON-ish answer.
            chunks.append(dict(base, choices=[{"index": 0, "delta": {"content": '{"title": "Scripted session"}'}, "finish_reason": None}]))
            finish = "stop"
        timings = {"cache_n": 0, "prompt_n": 100, "prompt_ms": 1.0, "predicted_n": 10, "predicted_ms": 1.0}
        chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
        chunks.append(dict(base, choices=[], usage={"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}, timings=timings))
        return chunks

    def _handler(self):
        upstream = self

        class ScriptedHandler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/props":
                    self.send_json(200, {"model_alias": "scripted", "total_slots": 1,
                                     "default_generation_settings": {"n_ctx": 32768}, "modalities": {"vision": False}})
                elif self.path == "/health":
                    self.send_json(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": "scripted", "object": "model", "meta": {"n_ctx": 32768}}]})
                else:
                    self.send_json(404, {"error": {"code": 404, "message": "not found", "type": "not_found_error"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                upstream.requests.append({"path": self.path, "body": body})
                if self.path == "/apply-template" and upstream.can_render:
                    self.send_json(200, {"prompt": json.dumps(body)})
                elif self.path == "/tokenize":
                    self.send_json(200, {"tokens": list(range(len(body.get("content", "")) // 4))})
                elif self.path == "/v1/chat/completions":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in upstream._reply(body):
                        frame = f"data: {json.dumps(chunk)}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                        self.wfile.flush()
                    done = b"data: [DONE]\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                else:
                    self.send_json(404, {"error": {"code": 404, "message": "not found", "type": "not_found_error"}})

        return ScriptedHandler
