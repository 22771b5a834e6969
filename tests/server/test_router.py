"""sparkserve behind the real ``vllm-router`` (PyPI, pinned in the ``test`` extra).

Fast part: the router-added request fields and the worker endpoints the router calls, on a fake engine.
Router part: fake-engine replicas (process start in about a second) for load spreading and a replica
killed mid-run; two real SmolLM2-135M replicas (``--drafter none``, one thread each) for streaming with
the OpenAI SDK, prefix affinity under ``cache_aware`` and both replicas' metrics.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import urllib.error
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest

from sparkserve.engine.config import EngineArgs
from sparkserve.server.protocol import ChatCompletionRequest, CompletionRequest
from sparkserve.server.replicas import (
    ReplicaSet,
    ReplicaSetConfig,
    replica_argv,
    router_argv,
    serve_flag,
    served_model,
)
from sparkserve.server.router_fields import UNSUPPORTED_VALUES
from sparkserve.testing.fake_engine import FakeEngine
from sparkserve.testing.router_harness import (
    replica_set,
    requests_served,
    require_router,
)
from sparkserve.testing.server_harness import (
    FAKE_ENGINE_COMMAND,
    free_port,
    free_port_run,
    run_server,
    wait_for,
)

# What vllm-router 0.1.17 adds to a forwarded chat / completions body (recorded on the wire).
ROUTER_CHAT_FIELDS = {
    "stream": False, "logprobs": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
    "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
    "return_hidden_states": False, "include_reasoning": True,
}
ROUTER_COMPLETION_FIELDS = {
    "stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
    "return_hidden_states": False,
}
MESSAGES = [{"role": "user", "content": "hello"}]


def test_router_added_fields_are_accepted() -> None:
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **ROUTER_CHAT_FIELDS})
    assert chat.no_stop_trim is False and chat.skip_special_tokens is True
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi", **ROUTER_COMPLETION_FIELDS})
    assert completion.return_hidden_states is False


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_VALUES))
def test_router_field_values_not_honoured_are_a_400(field: str) -> None:
    with run_server() as server, server.http() as http:
        body = {"model": server.engine.model_name, "messages": MESSAGES, field: UNSUPPORTED_VALUES[field]}
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_unknown_fields_stay_forbidden() -> None:
    with run_server() as server, server.http() as http:
        body = {"model": server.engine.model_name, "messages": MESSAGES, "no_stop_trimm": False}
        assert http.post("/v1/chat/completions", json=body).status_code == 400


def test_worker_endpoints_the_router_reads() -> None:
    engine = FakeEngine()
    with run_server(engine) as server, server.http() as http:
        assert http.get("/get_load").json() == {"load": 0}
        chat = http.post("/v1/chat/completions/render",
                         json={"model": engine.model_name, "messages": MESSAGES, **ROUTER_CHAT_FIELDS}).json()
        assert chat["token_ids"] == engine.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
        assert chat["model"] == engine.model_name
        completion = http.post("/v1/completions/render", json={"model": engine.model_name, "prompt": "hi"}).json()
        assert completion["token_ids"] == engine.tokenizer.encode("hi")
        assert http.post("/v1/chat/completions/render", json={"model": "other", "messages": MESSAGES}).status_code == 404
        # While a request runs, the engine holds it: the load counts it.
        slow = {"model": engine.model_name, "messages": [{"role": "user", "content": "{delay=0.2}"}], "max_tokens": 8}
        thread = threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": slow})
        thread.start()
        assert wait_for(lambda: http.get("/get_load").json()["load"] == 1, 10.0)
        thread.join()


def test_serve_kv_event_flags_reach_the_engine_args() -> None:
    from sparkserve.cli import build_parser, engine_args_from

    flags = ["--kv-events-endpoint", "tcp://*:5557", "--kv-events-topic", "kv", "--kv-events-replay-endpoint", "tcp://*:5558"]
    args = engine_args_from(build_parser().parse_args(["serve", *flags]))
    assert (args.kv_events_endpoint, args.kv_events_topic, args.kv_events_replay_endpoint) == (
        "tcp://*:5557", "kv", "tcp://*:5558")
    assert engine_args_from(build_parser().parse_args(["serve"])).kv_events_endpoint is None


def test_launcher_reads_the_served_model_with_the_replicas_api_key() -> None:
    engine = FakeEngine()
    with run_server(engine, api_key="k") as server:
        assert served_model(server.url, serve_flag(("--drafter", "none", "--api-key=k"), "--api-key")) == engine.model_name
        with pytest.raises(urllib.error.HTTPError):
            served_model(server.url)


def test_kv_aware_wiring_of_the_launcher() -> None:
    """Under kv_aware each replica publishes KV events on its own port and the router subscribes to each,
    with the replicas' block size and model name; other policies get neither."""
    require_router()  # router_argv names the binary
    config = ReplicaSetConfig(num_replicas=2, policy="kv_aware", serve_args=("--block-size", "32"),
                              replica_base_port=9000, kv_events_base_port=6000)
    assert replica_argv(config, 1)[-4:] == ["--kv-events-endpoint", "tcp://127.0.0.1:6001",
                                            "--kv-events-replay-endpoint", "tcp://127.0.0.1:6003"]
    argv = " ".join(router_argv(config, "m"))
    assert ("--kv-event-source http://127.0.0.1:9000=tcp://127.0.0.1:6000 "
            "--kv-event-replay-source http://127.0.0.1:9000=tcp://127.0.0.1:6002 "
            "--kv-event-source http://127.0.0.1:9001=tcp://127.0.0.1:6001 "
            "--kv-event-replay-source http://127.0.0.1:9001=tcp://127.0.0.1:6003") in argv
    assert "--kv-event-block-size 32" in argv and "--kv-event-model m" in argv
    assert ReplicaSetConfig(num_replicas=1, policy="kv_aware").block_size == EngineArgs.block_size
    plain = ReplicaSetConfig(num_replicas=2, policy="cache_aware")
    assert "--kv-events-endpoint" not in replica_argv(plain, 0) and "--kv-event-source" not in router_argv(plain)


def client(running: ReplicaSet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.config.router_url}/v1", api_key="unused", max_retries=0, timeout=60)


def fake_chat(running: ReplicaSet, content: str) -> str:
    reply = client(running).chat.completions.create(
        model=FakeEngine().model_name, messages=[{"role": "user", "content": content}], max_tokens=64
    )
    return reply.choices[0].message.content or ""


@pytest.mark.live_server
def test_power_of_two_spreads_load(tmp_path: Path) -> None:
    with replica_set(2, "power_of_two", tmp_path, fake=True) as running:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: fake_chat(running, f"[[r{i}]]{{delay=0.05}}"), range(16)))
        assert replies == [f"r{i}" for i in range(16)]
        served = [requests_served(url) for url in running.config.replica_urls]
    assert sum(served) == 16 and min(served) > 0, served


@pytest.mark.live_server
def test_killed_replica_loses_only_its_in_flight_requests(tmp_path: Path) -> None:
    """Clients keep sending while replica 1 is SIGKILLed: every request either gets its own reply or
    fails with a 5xx from the router (no hang, no wrong reply), at most the ones in flight (one per
    client) fail, and afterwards the router sends everything to replica 0."""
    num_clients, per_client = 6, 8
    outcomes: list[str] = []
    with replica_set(2, "round_robin", tmp_path, fake=True) as running:

        def send(i: int) -> None:
            for j in range(per_client):
                try:
                    reply = fake_chat(running, f"[[c{i}-{j}]]{{delay=0.05}}")
                    outcomes.append("ok" if reply == f"c{i}-{j}" else f"wrong reply {reply!r}")
                except openai.APIStatusError as exc:
                    outcomes.append(f"status {exc.status_code}")

        with ThreadPoolExecutor(num_clients) as pool:
            futures = [pool.submit(send, i) for i in range(num_clients)]
            assert wait_for(lambda: len(outcomes) >= 2 * num_clients, 10.0)
            served_by_victim = requests_served(running.config.replica_urls[1])
            running.replicas[1].proc.send_signal(signal.SIGKILL)
            for future in futures:
                future.result(timeout=120)
        failures = [o for o in outcomes if o != "ok"]
        assert served_by_victim > 0
        assert len(outcomes) == num_clients * per_client
        assert all(o.startswith("status 5") for o in failures) and len(failures) <= num_clients, failures
        before = requests_served(running.config.replica_urls[0])
        assert all(fake_chat(running, f"[[after{k}]]") == f"after{k}" for k in range(6))
        assert requests_served(running.config.replica_urls[0]) == before + 6


@pytest.fixture(scope="module")
def smol_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    """Two real SmolLM2-135M replicas (``--drafter none``, one thread each) behind ``cache_aware``."""
    serve_args = ("--drafter", "none", "--max-model-len", "1024", "--num-kv-blocks", "128")
    with replica_set(2, "cache_aware", tmp_path_factory.mktemp("smol"), fake=False, serve_args=serve_args) as running:
        yield running


def smol_model(running: ReplicaSet) -> str:
    return client(running).models.list().data[0].id


@pytest.mark.live_server
@pytest.mark.real_model
def test_streams_through_the_router_as_from_a_replica(smol_replicas: ReplicaSet) -> None:
    """Greedy output streamed through the router equals a replica's own non-streamed output for the same
    prompt. The reference runs on the other replica, where the prompt is not cached either: a prefix-cache
    hit computes the prompt's KV in other chunks, which may flip a near-tie in greedy decoding."""
    model, urls = smol_model(smol_replicas), smol_replicas.config.replica_urls
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    before = [requests_served(url) for url in urls]
    stream = client(smol_replicas).chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    other = urls[1 - serving_replica(urls, before)]
    direct = openai.OpenAI(base_url=f"{other}/v1", api_key="unused", max_retries=0, timeout=60)
    expected = direct.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.choices[0].finish_reason


def serving_replica(urls: list[str], before: list[int]) -> int:
    """Index of the one replica whose served-request count rose by one since ``before``."""
    deltas = [requests_served(url) - b for url, b in zip(urls, before, strict=True)]
    assert sorted(deltas) == [0] * (len(urls) - 1) + [1], deltas
    return deltas.index(1)


@pytest.mark.live_server
@pytest.mark.real_model
def test_cache_aware_keeps_a_conversation_on_its_replica(smol_replicas: ReplicaSet) -> None:
    """Every turn of a conversation lands on the replica that served its first turn, and the later
    turns reuse the KV of the earlier ones (``cached_tokens`` > 0, growing). Both replicas' metrics are
    scraped after each request: together they account for every request the router forwarded."""
    model, urls = smol_model(smol_replicas), smol_replicas.config.replica_urls
    conversations = [
        [{"role": "system", "content": "You answer questions about " + topic + ". " * 12}]
        for topic in ("the geography of mountains and rivers", "baking bread, cakes and pastries")
    ]
    cached: list[list[int]] = [[], []]
    replicas: list[set[int]] = [set(), set()]
    for turn in range(3):
        for k, messages in enumerate(conversations):
            before = [requests_served(url) for url in urls]
            messages.append({"role": "user", "content": f"Question {turn}: tell me one fact."})
            reply = client(smol_replicas).chat.completions.create(
                model=model, messages=messages, max_tokens=8, temperature=0
            )
            replicas[k].add(serving_replica(urls, before))
            messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
            details = reply.usage.prompt_tokens_details
            cached[k].append(details.cached_tokens if details is not None else 0)
    assert all(len(r) == 1 for r in replicas), replicas
    assert all(c[1] > 0 and c[2] > c[1] for c in cached), cached


def start_launcher(log_dir: Path) -> subprocess.Popen[str]:
    """``sparkserve replicas`` with two fake replicas; it prints "router on ..." once all are up."""
    replica_base = free_port_run(2)  # both replica ports free (one free port may be followed by a taken one)
    router_port = free_port_run(1, avoid=range(replica_base, replica_base + 2))
    argv = [sys.executable, "-m", "sparkserve", "replicas", "--num-replicas", "2", "--port", str(router_port),
            "--replica-base-port", str(replica_base), "--replica-command", " ".join(FAKE_ENGINE_COMMAND),
            f"--router-arg=--prometheus-port={free_port()}", "--log-dir", str(log_dir)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie; a process that exits between the two checks is not alive (psutil
    raises NoSuchProcess for it, which made this check flaky on a loaded machine)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.live_server
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_replicas_command_leaves_no_orphan(tmp_path: Path, sig: signal.Signals) -> None:
    """``sparkserve replicas`` stops the router and every replica on SIGTERM / Ctrl-C and exits 0."""
    require_router()
    launcher = start_launcher(tmp_path)
    try:
        assert "router on" in (launcher.stdout.readline() if launcher.stdout else "")
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 3  # two replicas and the router
        launcher.send_signal(sig)
        assert launcher.wait(timeout=60) == 0
        assert wait_for(lambda: not any(alive(c) for c in children), 10.0)
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.live_server
def test_replicas_command_stops_all_when_a_replica_dies(tmp_path: Path) -> None:
    require_router()
    launcher = start_launcher(tmp_path)
    try:
        assert "router on" in (launcher.stdout.readline() if launcher.stdout else "")
        children = psutil.Process(launcher.pid).children(recursive=True)
        replica = next(c for c in children if "fake_engine" in " ".join(c.cmdline()))
        replica.kill()
        assert launcher.wait(timeout=60) == 1
        assert wait_for(lambda: not any(alive(c) for c in children), 10.0)
    finally:
        if launcher.poll() is None:
            launcher.kill()
