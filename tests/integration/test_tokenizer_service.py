"""The tokenizer service on loopback: a real server, a real channel, the HF tokenizer as oracle."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire.services.tokenizer.server import (
    ServedTokenizer,
    TokenizerConfig,
    TokenizerServicer,
    serve,
)
from pagewire.tokenizer.loader import load_tokenizer
from pagewire.v1 import tokenizer_pb2 as pb
from pagewire.v1 import tokenizer_pb2_grpc

EMOJI_TEXT = "Grüße aus Köln 👋🏽 — 日本語のテキスト 🎉👨‍👩‍👧 ok!"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour 🎨."},
]
TIMEOUT_S = 5.0


class BackgroundLoop:
    """An event loop in a thread, so the aio server runs beside plain blocking test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def background():
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def channel(background):
    server = background.run(serve(TokenizerConfig(port=0)))
    with grpc.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
        yield channel
    background.run(server.stop(None))


@pytest.fixture()
def stub(channel):
    return tokenizer_pb2_grpc.TokenizerStub(channel)


def chat_request(messages, add_generation_prompt=True) -> pb.TokenizeRequest:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
    return pb.TokenizeRequest(chat=chat, add_generation_prompt=add_generation_prompt)


def detokenize(stub, requests) -> list[str]:
    return [r.text for r in stub.Detokenize(iter(requests), timeout=TIMEOUT_S)]


def assert_still_serving(stub, tokenizer) -> None:
    response = stub.Tokenize(pb.TokenizeRequest(text="still here"), timeout=TIMEOUT_S)
    assert list(response.token_ids) == tokenizer.encode("still here", add_special_tokens=False)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_tokenize_text_matches_the_hf_tokenizer(stub, tokenizer, add_special_tokens):
    request = pb.TokenizeRequest(text=EMOJI_TEXT, add_special_tokens=add_special_tokens)
    response = stub.Tokenize(request, timeout=TIMEOUT_S)
    expected = tokenizer.encode(EMOJI_TEXT, add_special_tokens=add_special_tokens)
    assert list(response.token_ids) == expected


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tokenize_chat_matches_apply_chat_template(stub, tokenizer, add_generation_prompt):
    response = stub.Tokenize(chat_request(CHAT, add_generation_prompt), timeout=TIMEOUT_S)
    expected = tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert list(response.token_ids) == list(expected)


def test_detokenize_streams_emoji_text_one_token_per_message(stub, tokenizer):
    prompt_ids = tokenizer.encode("Say it:")
    output_ids = tokenizer.encode(EMOJI_TEXT)
    requests = [pb.DetokenizeRequest(prompt_token_ids=prompt_ids, skip_special_tokens=True)]
    requests += [pb.DetokenizeRequest(token_ids=[i]) for i in output_ids]
    requests.append(pb.DetokenizeRequest(finish=True))
    chunks = detokenize(stub, requests)
    assert len(chunks) == len(requests)  # one answer per message
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "".join(chunks) == tokenizer.decode(output_ids, clean_up_tokenization_spaces=False)
    assert "".join(chunks) == EMOJI_TEXT
    assert sum(1 for chunk in chunks[1:-1] if chunk == "") > 0  # emoji bytes were held back


def test_finish_flushes_held_back_text(stub, tokenizer):
    emoji_ids = tokenizer.encode("🎉")
    assert len(emoji_ids) > 1, "the test needs a character split over tokens"
    partial_ids = tokenizer.encode("Hi ") + emoji_ids[:-1]
    chunks = detokenize(stub, [
        pb.DetokenizeRequest(token_ids=partial_ids),
        pb.DetokenizeRequest(finish=True),
    ])
    assert chunks[0] == ""  # held back: the window ends mid-character
    assert chunks[1] == tokenizer.decode(partial_ids, clean_up_tokenization_spaces=False)


def test_finish_in_the_last_token_message(stub, tokenizer):
    ids = tokenizer.encode(" world 🎉")
    chunks = detokenize(stub, [
        pb.DetokenizeRequest(prompt_token_ids=tokenizer.encode("hello"), token_ids=ids[:2]),
        pb.DetokenizeRequest(token_ids=ids[2:], finish=True),
    ])
    assert "".join(chunks) == " world 🎉"


def test_model_info_describes_the_embedded_model(stub, tokenizer, embedded_source):
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT_S)
    assert info.model == embedded_source.name
    assert info.vocab_size == len(tokenizer)
    assert info.max_model_len > 0
    assert tokenizer.eos_token_id in info.eos_token_ids
    assert info.has_chat_template


def test_token_bytes_rebuild_multibyte_text_exactly(stub, tokenizer):
    ids = tokenizer.encode(EMOJI_TEXT)
    response = stub.TokenBytes(pb.TokenBytesRequest(token_ids=ids), timeout=TIMEOUT_S)
    pieces = list(response.token_bytes)
    assert len(pieces) == len(ids)
    assert b"".join(pieces).decode() == tokenizer.decode(ids)
    assert any(_is_partial_utf8(piece) for piece in pieces)  # the case a decode would garble


def _is_partial_utf8(piece: bytes) -> bool:
    try:
        piece.decode()
    except UnicodeDecodeError:
        return True
    return False


def test_token_bytes_of_a_special_token_is_its_text(stub, tokenizer):
    response = stub.TokenBytes(pb.TokenBytesRequest(token_ids=[tokenizer.eos_token_id]),
                               timeout=TIMEOUT_S)
    assert response.token_bytes[0].decode() == tokenizer.eos_token


def test_token_bytes_of_an_unknown_id_is_invalid_argument(stub, tokenizer):
    with pytest.raises(grpc.RpcError) as error:
        stub.TokenBytes(pb.TokenBytesRequest(token_ids=[5, 10**9]), timeout=TIMEOUT_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1000000000" in error.value.details()


@pytest.mark.parametrize("service", ["", "pagewire.v1.Tokenizer"])
def test_health_check_reports_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


BAD_TOKENIZE = {
    "empty text": (pb.TokenizeRequest(text=""), "must not be empty"),
    "no input": (pb.TokenizeRequest(), "one of `text` or `chat`"),
    "no messages": (pb.TokenizeRequest(chat=pb.ChatMessages()), "must not be empty"),
    "unknown role": (chat_request([{"role": "wizard", "content": "hi"}]), "'wizard'"),
}


@pytest.mark.parametrize("case", BAD_TOKENIZE, ids=list(BAD_TOKENIZE))
def test_bad_tokenize_request_is_invalid_argument(stub, tokenizer, case):
    request, message = BAD_TOKENIZE[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(request, timeout=TIMEOUT_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert_still_serving(stub, tokenizer)


BAD_DETOKENIZE = {
    "prompt id out of vocab": ([pb.DetokenizeRequest(prompt_token_ids=[1, 10**9])], "10000000"),
    "token id out of vocab": (
        [pb.DetokenizeRequest(token_ids=[1]), pb.DetokenizeRequest(token_ids=[49152])], "49152"
    ),
    "prompt on a later message": (
        [pb.DetokenizeRequest(token_ids=[1]), pb.DetokenizeRequest(prompt_token_ids=[1])],
        "first message only",
    ),
    "message after finish": (
        [pb.DetokenizeRequest(finish=True), pb.DetokenizeRequest(token_ids=[1])], "finish"
    ),
}


@pytest.mark.parametrize("case", BAD_DETOKENIZE, ids=list(BAD_DETOKENIZE))
def test_bad_detokenize_stream_is_invalid_argument(stub, tokenizer, case):
    requests, message = BAD_DETOKENIZE[case]
    with pytest.raises(grpc.RpcError) as error:
        detokenize(stub, requests)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert_still_serving(stub, tokenizer)


def test_chat_without_template_is_failed_precondition(background, embedded_source, tokenizer):
    bare_tokenizer = load_tokenizer(embedded_source)
    bare_tokenizer.chat_template = None
    served = ServedTokenizer(embedded_source, bare_tokenizer, pb.ModelInfo())

    async def start():
        server = grpc.aio.server()
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(served), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = background.run(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Tokenize(chat_request(CHAT), timeout=TIMEOUT_S)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no chat template" in error.value.details()
            assert_still_serving(stub, tokenizer)
    finally:
        background.run(server.stop(None))


def test_short_deadline_on_a_normal_request_succeeds_quickly(stub, tokenizer):
    start = time.monotonic()
    response = stub.Tokenize(pb.TokenizeRequest(text="a normal prompt"), timeout=0.5)
    stream = detokenize_with_deadline(stub, response.token_ids, timeout_s=0.5)
    assert time.monotonic() - start < 1.0
    assert "".join(stream) == "a normal prompt"


def detokenize_with_deadline(stub, token_ids, timeout_s: float) -> list[str]:
    requests = iter([pb.DetokenizeRequest(token_ids=token_ids, finish=True)])
    return [r.text for r in stub.Detokenize(requests, timeout=timeout_s)]


def test_a_long_prompt_does_not_block_other_calls(stub):
    long_request = pb.TokenizeRequest(text="lorem ipsum dolor sit amet " * 40_000)
    pending = stub.Tokenize.future(long_request, timeout=30)
    time.sleep(0.1)  # the long prompt is being tokenized now
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=0.3)  # answered meanwhile
    assert info.vocab_size > 0
    assert len(pending.result().token_ids) > 100_000


@pytest.mark.parametrize("text", [
    "    " * 2000 + "return x",          # indentation: long whitespace tokens
    "supercalifragilistic " * 500,
    "héllo wörld 😀 " * 300,
])
def test_max_token_bytes_bounds_the_token_count_from_below(stub, text):
    """The gateway refuses text of n bytes when n / max_token_bytes exceeds the context: the
    bound must hold for any text (a too-small value would refuse prompts that fit)."""
    info = stub.GetModelInfo(pb.ModelInfoRequest())
    ids = stub.Tokenize(pb.TokenizeRequest(text=text)).token_ids
    assert info.max_token_bytes > 1
    assert -(-len(text.encode()) // info.max_token_bytes) <= len(ids)
