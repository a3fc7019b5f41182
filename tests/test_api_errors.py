"""Every bad request gets OpenAI-style JSON with the right status, through raw HTTP and through the
official `openai` client; never a 500 or a hang. Pure checks first, then a small keyed stack."""

from __future__ import annotations

import os
import re

import httpx
import openai
import pytest

from launch.fastchat_patches.api_guard import errors, validate
from launch.state import read_state
from tests.stackutil import default_models, free_ports_config, stack_for

KEY = "sk-errors-7c3b"
MODEL = "smollm2-135m"
OK_MSG = [{"role": "user", "content": "Say hi."}]

# (case id, request body overrides, expected param or None): all must be 400 invalid_request_error.
BAD_PARAMS = [
    ("temperature_negative", {"temperature": -0.5}, "temperature"),
    ("temperature_above_2", {"temperature": 2.5}, "temperature"),
    ("top_p_zero", {"top_p": 0}, "top_p"),
    ("top_p_above_1", {"top_p": 1.5}, "top_p"),
    ("max_tokens_zero", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens_negative", {"max_tokens": -3}, "max_tokens"),
    ("n_2", {"n": 2}, "n"),
    ("messages_empty", {"messages": []}, "messages"),
    ("messages_string", {"messages": "hi"}, "messages"),
    ("message_without_role", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("message_without_content", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("role_unknown", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("role_tool", {"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ("messages_not_objects", {"messages": [1, 2]}, None),
    ("model_missing", {"model": None}, None),
]


def _body(over: dict) -> dict:
    body = {"model": MODEL, "messages": OK_MSG, "max_tokens": 4}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


# ---- pure: the validation and the status table -------------------------------------------------

def test_fastchat_codes_map_to_openai_statuses():
    assert errors.from_fastchat(40301, "x").status == 404
    assert errors.from_fastchat(40302, "x").status == 400
    assert errors.from_fastchat(40303, "x").code == "context_length_exceeded"
    assert errors.from_fastchat(50005, "x").status == 503
    assert errors.from_fastchat(50006, "x").retry_after is not None
    assert errors.from_fastchat(50001, "x").status == 500


def test_validation_accepts_valid_and_edge_values():
    from fastchat.protocol.openai_api_protocol import ChatCompletionRequest

    for over in ({}, {"temperature": 0}, {"temperature": 2}, {"top_p": 1}, {"top_p": 0.01}, {"max_tokens": 1},
                 {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a"}, {"role": "user", "content": ""}]},
                 {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}):
        assert validate.check_request(ChatCompletionRequest(**_body(over))) is None, over


# ---- the stack --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def estack(tmp_path_factory):
    st = stack_for(free_ports_config(tmp_path_factory.mktemp("errors"), models=default_models([MODEL])))
    try:
        st.up(api_keys=KEY)
        yield st
    finally:
        st.down()


@pytest.fixture(scope="module")
def raw(estack):
    with httpx.Client(base_url=estack.api_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(estack):
    return openai.OpenAI(base_url=estack.api_url, api_key=KEY, timeout=60, max_retries=0)


def _assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"], err
    if code:
        assert err["code"] == code, err
    return err



@pytest.mark.stack
@pytest.mark.parametrize("case,over,param", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_parameters_are_400_raw(raw, case, over, param):
    err = _assert_openai_error(raw.post("/chat/completions", json=_body(over)), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err


@pytest.mark.stack
@pytest.mark.parametrize("case,over,param", [c for c in BAD_PARAMS if c[0] != "model_missing"],
                         ids=[c[0] for c in BAD_PARAMS if c[0] != "model_missing"])
def test_bad_parameters_are_400_openai(oai, case, over, param):
    kwargs = _body(over)
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(**kwargs)
    assert exc.value.status_code == 400 and exc.value.body["message"]


@pytest.mark.stack
def test_non_json_body_is_400(raw, oai):
    r = raw.post("/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert _assert_openai_error(r, 400, "invalid_json")
    # The openai client always sends JSON; its lowest-level call can still send a raw body.
    with pytest.raises(openai.BadRequestError):
        oai.post("/chat/completions", cast_to=object, content=b"{not json",
                 options={"headers": {"Content-Type": "application/json"}})


@pytest.mark.stack
def test_completions_endpoint_validates_too(raw):
    _assert_openai_error(raw.post("/completions", json={"model": MODEL, "prompt": "x", "top_p": 0}), 400)
    _assert_openai_error(raw.post("/completions", json={"model": MODEL, "prompt": "", "max_tokens": 2}), 400)


@pytest.mark.stack
def test_unknown_model_is_404(raw, oai):
    err = _assert_openai_error(raw.post("/chat/completions", json=_body({"model": "gpt-17"})), 404, "model_not_found")
    assert MODEL in err["message"]  # says what is available
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(**_body({"model": "gpt-17"}))


@pytest.mark.stack
def test_prompt_longer_than_the_context_is_400_with_token_counts(raw, oai):
    long = [{"role": "user", "content": "hello " * 9000}]  # SmolLM2's context: 8192 tokens
    err = _assert_openai_error(raw.post("/chat/completions", json=_body({"messages": long})), 400,
                               "context_length_exceeded")
    nums = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert 8192 in nums and any(n > 8192 for n in nums if n != 8192), err["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(**_body({"messages": long}))
    assert exc.value.code == "context_length_exceeded"


@pytest.mark.stack
def test_missing_or_wrong_api_key_is_401(estack, oai):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{estack.api_url}/chat/completions", json=_body({}), headers=headers, timeout=30)
        _assert_openai_error(r, 401, "invalid_api_key")
    assert httpx.get(f"{estack.api_url}/models", timeout=30).status_code == 401
    bad = openai.OpenAI(base_url=estack.api_url, api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**_body({}))
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.stack
def test_valid_requests_still_work_with_the_key(oai):
    r = oai.chat.completions.create(model=MODEL, messages=OK_MSG, max_tokens=4)
    assert r.choices[0].message.content is not None
    chunks = list(oai.chat.completions.create(model=MODEL, messages=OK_MSG, max_tokens=4, stream=True))
    assert chunks and all(c.id == chunks[0].id for c in chunks)


@pytest.mark.stack
def test_api_process_command_line_carries_no_key(estack):
    state = read_state(estack.run_dir)
    for svc in state.services.values():
        cmdline = open(f"/proc/{svc.pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        assert KEY not in cmdline and "--api-keys" not in cmdline, svc.name
    api_env = open(f"/proc/{state.services['api'].pid}/environ", "rb").read().split(b"\0")
    assert f"CPU_ARENA_API_KEYS={KEY}".encode() in api_env  # it comes through the environment
    assert os.environ.get("CPU_ARENA_API_KEYS") != KEY  # and the fixture did not leak it to later tests
