"""The embedded Qwen tokenizer loads without transformers' false "incorrect regex pattern" (fix_mistral_regex)
warning, and nothing else is silenced: transformers' logger keeps its level and handlers, other warnings still
show, and a real Mistral checkpoint still gets the warning. Marked `models` and slow like the other tests of
the real converted checkpoints (they exist after `make setup`)."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest

from tests.fixtures.embedded import real_checkpoint

pytestmark = pytest.mark.models
QWEN = "Qwen2.5-Coder-0.5B-Instruct"
MISTRAL_REGEX_WARNING = "fix_mistral_regex"
TEXTS = (
    "你好，世界！今天天气很好。",
    "The quick brown fox jumps over the lazy dog's back, don't you think?",
    "def f(x):\n    return [i**2 for i in range(x)]  # 平方\n\tprint('ok')\r\n",
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


@pytest.fixture
def transformers_log():
    """What transformers logs, warnings included. A handler on its own logger: it does not propagate to the
    root logger, so caplog would see nothing. The level is lowered to WARNING only if the environment raised
    it (TRANSFORMERS_VERBOSITY), so the test cannot pass just because warnings were off."""
    from transformers.utils import logging as tlog

    root = tlog.get_logger("transformers")
    level = root.level
    if root.getEffectiveLevel() > logging.WARNING:
        root.setLevel(logging.WARNING)
    handler = _Records()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def qwen_path():
    return real_checkpoint(QWEN)


def _quiet_state():
    from transformers.utils import logging as tlog

    root = tlog.get_logger("transformers")
    return root.level, root.getEffectiveLevel(), list(root.handlers), root.propagate, list(warnings.filters)


@pytest.mark.slow
def test_transformers_flags_the_embedded_qwen_tokenizer_when_loaded_plainly(qwen_path, transformers_log):
    """The premise: transformers 4.57.6 warns for this checkpoint (config.json says 4.57.6). If this fails after
    a transformers upgrade, the check was fixed upstream and worker_adapters.common.load_tokenizer's
    fix_mistral_regex=False can go."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(qwen_path)
    assert any(MISTRAL_REGEX_WARNING in m for m in transformers_log.messages())


@pytest.mark.slow
def test_embedded_qwen_tokenizer_loads_without_the_mistral_regex_warning(qwen_path, transformers_log):
    from transformers import AutoTokenizer
    from transformers.utils import logging as tlog

    from worker_adapters import chat_template
    from worker_adapters.checkpoint import read_checkpoint
    from worker_adapters.common import load_tokenizer

    before = _quiet_state()
    chat_template._template_spec.cache_clear()  # a cached spec would skip the tokenizer load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv = chat_template.conversation_for(qwen_path)  # what the worker, API server and UI do
        tok = load_tokenizer(qwen_path, read_checkpoint(qwen_path), trust_remote_code=False)
        # Nothing was silenced: a transformers warning logged now still arrives.
        tlog.get_logger("transformers.tokenization_utils_base").warning("probe: other warnings still show")
    chat_template._template_spec.cache_clear()

    messages = transformers_log.messages()
    assert not [m for m in messages if MISTRAL_REGEX_WARNING in m or "incorrect regex" in m], messages
    assert not [w for w in caught if MISTRAL_REGEX_WARNING in str(w.message)]
    assert "probe: other warnings still show" in messages
    assert _quiet_state() == before  # same level, handlers, propagation and warnings filters
    assert conv.stop_token_ids  # the template spec really was built from the tokenizer

    # The tokenizer is exactly the saved one (False leaves the regex alone): same ids as a plain load.
    plain = AutoTokenizer.from_pretrained(qwen_path)
    assert tok.backend_tokenizer.pre_tokenizer.__getstate__() == plain.backend_tokenizer.pre_tokenizer.__getstate__()
    for text in TEXTS:
        assert tok(text).input_ids == plain(text).input_ids
    assert tok(TEXTS[0]).input_ids == [108386, 3837, 99489, 6313, 100644, 104307, 101243, 1773]


@pytest.mark.slow
def test_a_mistral_checkpoint_still_gets_the_warning(qwen_path, tmp_path, transformers_log):
    """The flag is only passed for non-Mistral model types: a real Mistral tokenizer must still be flagged."""
    from worker_adapters.checkpoint import read_checkpoint
    from worker_adapters.common import load_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(qwen_path / name, tmp_path / name)
    config = json.loads((qwen_path / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))

    load_tokenizer(tmp_path, read_checkpoint(tmp_path), trust_remote_code=False)
    assert any(MISTRAL_REGEX_WARNING in m for m in transformers_log.messages())
