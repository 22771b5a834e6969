"""lm-evaluation-harness (``local-completions``) against a live server on the real SmolLM2 with
speculation on: a loglikelihood task and a generation task from local files (no hub). The tokenizer
comes from the server (``/tokenizer_info``, ``/tokenize``, ``/detokenize``: lm-eval's remote backend);
lm-eval's scores must equal a direct computation from the server's own echo logprobs and completions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import httpx
import pytest

from sparkserve.testing.server_harness import RunningServer

DATA = Path(__file__).resolve().parents[1] / "data"
TASKS = DATA / "lm_eval"


@pytest.fixture(scope="module")
def server(smol_server: RunningServer) -> RunningServer:
    return smol_server


@pytest.fixture(scope="module")
def results(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("tasks")
    for name in ("sparkserve_mc.yaml", "sparkserve_gen.yaml"):
        (folder / name).write_text((TASKS / name).read_text().replace("DATA_DIR", str(TASKS)))
    model_args = {"model": "smol", "base_url": f"{server.url}/v1/completions", "num_concurrent": 1,
                  "max_retries": 1, "tokenized_requests": True, "max_length": 512}
    # Hub libraries read their offline switches at import: set them first, then import lm-eval.
    with mock.patch.dict(os.environ, {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}):
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        return simple_evaluate(model="local-completions", model_args=model_args, tasks=["sparkserve_mc", "sparkserve_gen"],
                               task_manager=TaskManager(include_path=str(folder)), log_samples=True, batch_size=1,
                               random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def _tokenize(http: httpx.Client, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


def _loglikelihood(http: httpx.Client, context: str, continuation: str) -> float:
    """Sum of the continuation tokens' logprobs, from the server's echo (lm-eval's token split)."""
    whole, ctx = _tokenize(http, context + continuation), _tokenize(http, context)
    body = {"model": "smol", "prompt": whole, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    token_logprobs = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
    return sum(token_logprobs[len(ctx):])


def test_loglikelihood_task_equals_server_logprobs(server: RunningServer, results: dict) -> None:
    docs = [json.loads(line) for line in (TASKS / "mc.jsonl").read_text().splitlines()]
    samples = sorted(results["samples"]["sparkserve_mc"], key=lambda s: s["doc_id"])
    correct = 0
    with server.http() as http:
        for doc, sample in zip(docs, samples, strict=True):
            lls = [_loglikelihood(http, doc["question"], " " + choice) for choice in doc["choices"]]
            assert [r[0][0] for r in sample["resps"]] == pytest.approx(lls, abs=1e-3)
            correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
    assert results["results"]["sparkserve_mc"]["acc,none"] == pytest.approx(correct / len(docs))


def test_generation_task_equals_server_completions(server: RunningServer, results: dict) -> None:
    docs = [json.loads(line) for line in (TASKS / "gen.jsonl").read_text().splitlines()]
    samples = sorted(results["samples"]["sparkserve_gen"], key=lambda s: s["doc_id"])
    matches = 0
    with server.http() as http:
        for doc, sample in zip(docs, samples, strict=True):
            body = {"model": "smol", "prompt": _tokenize(http, f"Question: {doc['question']}\nAnswer:"),
                    "max_tokens": 8, "temperature": 0, "stop": ["\n", "."]}
            text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert sample["resps"][0][0] == text
            matches += text == f" {doc['answer']}"
    assert results["results"]["sparkserve_gen"]["exact_match,none"] == pytest.approx(matches / len(docs))
