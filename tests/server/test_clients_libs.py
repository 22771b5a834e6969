"""Real client libraries (the ``clients`` extra) against a live server: the OpenAI Agents SDK over the
Responses API, instructor, LangChain's ChatOpenAI and the openai SDK's ``chat.completions.parse``.
Protocol, not answer quality: the Agents SDK runs on the fake engine (scripted tool call, then a reply);
the structured-output libraries need the grammar path, so they run on the real SmolLM2 with speculation
on (the shipped drafter)."""

from __future__ import annotations

import asyncio
from typing import Literal

import agents
import instructor
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from sparkserve.testing.fake_engine import FakeEngine
from sparkserve.testing.server_harness import RunningServer, run_server

CALL = '[[<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>]]'


class Weather(BaseModel):
    """The weather of a city."""

    unit: Literal["celsius", "fahrenheit"]
    sunny: bool
    degrees: int = Field(ge=-50, le=50)


class GetWeather(BaseModel):
    """Get the current weather of a city."""

    city: Literal["Paris", "Berlin"]


@pytest.fixture
def smol(smol_server: RunningServer) -> RunningServer:
    return smol_server


def test_agents_sdk_tool_round_trip() -> None:
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather of a city."""
        calls.append(city)
        return "18 degrees [[It is 18 degrees in Paris.]]"  # the fake engine's next reply

    agents.set_tracing_disabled(True)  # nothing outside is reachable
    with run_server(FakeEngine(max_model_len=4096)) as srv:
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        model = agents.OpenAIResponsesModel(model="fake-model", openai_client=client)
        agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model)
        result = asyncio.run(agents.Runner.run(agent, CALL))
    assert calls == ["Paris"] and result.final_output == "It is 18 degrees in Paris."
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


def test_openai_sdk_parse(smol: RunningServer) -> None:
    completion = smol.openai().chat.completions.parse(
        model="smol", messages=[{"role": "user", "content": "Weather in Paris as JSON."}], response_format=Weather,
        max_tokens=48, temperature=0.0)
    assert isinstance(completion.choices[0].message.parsed, Weather)


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor(smol: RunningServer, mode: instructor.Mode) -> None:
    client = instructor.from_openai(smol.openai(), mode=mode)
    weather = client.chat.completions.create(
        model="smol", response_model=Weather, max_retries=0, max_tokens=48, temperature=0.0,
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert isinstance(weather, Weather)


def test_openai_sdk_responses_parse(smol: RunningServer) -> None:
    response = smol.openai().responses.parse(model="smol", input="Weather in Paris as JSON.", text_format=Weather,
                                             max_output_tokens=48, temperature=0.0)
    assert isinstance(response.output_parsed, Weather) and response.status == "completed"


def test_langchain_bind_tools_and_structured_output(smol: RunningServer) -> None:
    llm = ChatOpenAI(model="smol", base_url=f"{smol.url}/v1", api_key="unused", temperature=0.0, max_tokens=48,
                     max_retries=0)
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(message.tool_calls[0]["args"])
    weather = llm.with_structured_output(Weather).invoke("Weather in Paris as JSON.")
    assert isinstance(weather, Weather)
