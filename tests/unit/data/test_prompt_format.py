"""One prompt format end to end: training, scoring, feedback, MMRA and serving all turn the
same conversation into the same token ids (data/encode.py), with or without a template."""

import pytest

from emdpo_ray.config import DataConfig
from emdpo_ray.data.encode import encode
from emdpo_ray.data.records import parse_record
from emdpo_ray.models.scoring import prompt_token_ids
from emdpo_ray.models.tiny import train_tokenizer
from emdpo_ray.serve.api import ChatRequest

TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>"
            "{% endfor %}{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why tides?"}]


@pytest.fixture(params=["template", "plain"])
def tok(request):
    t = train_tokenizer(["Be brief. Why tides? The moon pulls.", "system user assistant"], 320)
    if request.param == "template":
        t.chat_template = TEMPLATE
    return t


def _training_prompt_ids(tok, record):
    enc = encode([record], tok, DataConfig())
    start = int(enc.loss_mask[0, 0].argmax())  # first response token
    return enc.input_ids[0, 0, :start].tolist()


def test_every_path_gives_the_same_prompt_ids(tok):
    record = parse_record({"user_id": "u", "prompt": CONV,
                           "chosen": [{"role": "assistant", "content": "The moon."}],
                           "rejected": [{"role": "assistant", "content": "Wind."}]}, "t:1")
    training = _training_prompt_ids(tok, record)
    # feedback: the router stores record.to_json(); the policy server parses and encodes it
    feedback = _training_prompt_ids(tok, parse_record({**record.to_json(), "user_id": "u"},
                                                      "feedback"))
    # MMRA sampling and serving: prompt_token_ids of the conversation
    mmra = prompt_token_ids(tok, [record.messages], 10 ** 9)[0]
    chat = ChatRequest.model_validate({"messages": CONV})
    serving = prompt_token_ids(tok, [chat.conversation()], 10 ** 9)[0]
    assert training == feedback == mmra == serving
    if tok.chat_template:
        # exactly what the model's own template makes of it
        assert training == tok.apply_chat_template(CONV, tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
    else:
        # no template: bos + the contents, one a line (as /v1/chat/completions renders it)
        assert training == [tok.bos_token_id] + tok("Be brief.\nWhy tides?",
                                                    add_special_tokens=False)["input_ids"]


def test_plain_text_prompts_never_go_through_the_template(tok):
    rec = parse_record({"user_id": "u", "prompt": "Why tides?", "chosen": "a", "rejected": "b"},
                       "t:1")
    ids = [tok.bos_token_id] + tok("Why tides?", add_special_tokens=False)["input_ids"]
    assert _training_prompt_ids(tok, rec) == ids == prompt_token_ids(tok, ["Why tides?"], 99)[0]
