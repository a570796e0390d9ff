"""The tokenizers against their reference, ``transformers`` itself: small BPE tokenizers are trained here with the
``tokenizers`` library (byte-level like GPT-2/Qwen/Llama 3, byte-fallback SentencePiece-style like Llama 2/Mistral),
saved as checkpoint directories in the layouts real checkpoints use, and loaded both by ``HFTokenizer.from_dir``
and by ``transformers.AutoTokenizer``: ids, text, streamed text and rendered chat templates must be identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from infer import tokenizer as byte_tokenizer
from infer.tokenizer import BYTES, ChatTemplateError, HFTokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 -- isn't it?",
    "naïve café, résumé; coöperate Ωμέγα Привет мир",
    "日本語のテキストと中文文本，한국어 텍스트도。",
    "emoji 😀🎉 family 👩‍👩‍👧 thumbs 👍🏽 flag 🇫🇷",
    "combining e\u0301 a\u0308 o\u0302\u0323 Z\u0335\u0321a\u0337lgo",
    "whitespace  runs   and\ttabs\t\tand\n\nnew\r\nlines    ",
    "   leading spaces and trailing ones   ",
    'def f(x):\n    return {"y": x ** 2}  # code\n',
    "numbers 1234567890 and symbols @#$%^&*()[]{}<>",
]
TEXTS = CORPUS + ["", " ", "a", "\n", "a" * 40, "<|im_start|>inline <|im_end|> specials", "<think>kept</think>",
                  "ありがとう😀", "\u200b zero width \ufeff bom", "x\U0010ffff private use"]

QWEN_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
{%- endif %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools %}
    {{- '\\n\\n# Tools\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {{- '<|im_start|>assistant' + ('\\n' + message.content if message.content else '') }}
        {%- for call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}
            {{- '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {%- if message.reasoning_content %}
            {{- '<|im_start|>' + message.role + '\\n<think>' + message.reasoning_content + '</think>' }}
            {{- message.content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- set today = strftime_now('%d %b %Y') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + today + '\\n\\n' + system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# no whitespace control at all: trim_blocks and lstrip_blocks decide the output; plus namespace, dict, loop controls
# and a {% generation %} block
PLAIN_TEMPLATE = """\
{% set ns = namespace(turns=0) %}
{% set tags = dict(user='USER', system='SYSTEM') %}
{% for message in messages %}
    {% if message.role == 'assistant' %}
{% generation %}ASSISTANT: {{ message.content }}{{ eos_token }}{% endgeneration %}
    {% else %}
{{ tags[message.role] }}: {{ message.content }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if ns.turns >= 8 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT:{% endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Bonjour, ça va ?"},
     {"role": "assistant", "content": "Très bien, merci ! 😀"}, {"role": "user", "content": "日本語で？"}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "The answer.", "reasoning": "Let me see\n\n  step by step"},
     {"role": "user", "content": "  whitespace\t\n runs  "}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "e.g. Zürich"}},
                                                          "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": '{"temp_c": 21, "sky": "☀"}'},
]


def train(tokenizer: Tokenizer, specials: list[str], vocab_size: int, **options) -> Tokenizer:
    tokenizer.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                  show_progress=False, **options))
    return tokenizer


def byte_level(specials: list[str], vocab_size: int = 330) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return train(tok, specials, vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def write(path: Path, files: dict[str, object]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, indent=1)
        (path / name).write_text(text, encoding="utf-8")
    return path


def qwen_style(path: Path) -> Path:
    """Byte-level BPE, no BOS, ChatML specials plus a non-special added token, the template and
    ``added_tokens_decoder`` in tokenizer_config.json (the layout transformers 4.x saved), two EOS ids."""
    tok = byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["<think>", "</think>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t.special} for i, t in tok.get_added_tokens_decoder().items()}
    config = {"added_tokens_decoder": added, "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
              "chat_template": QWEN_TEMPLATE, "clean_up_tokenization_spaces": False, "model_max_length": 32768,
              "split_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    return write(path, {"tokenizer.json": tok.to_str(), "tokenizer_config.json": config,
                        "generation_config.json": {"eos_token_id": ids}})


def llama3_style(path: Path) -> Path:
    """Byte-level BPE whose post-processor adds BOS, saved by transformers 5 itself (the template in
    chat_template.jinja, no added_tokens_decoder), generation_config's eos_token_id a list."""
    from transformers import PreTrainedTokenizerFast

    tok = byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            chat_template=LLAMA3_TEMPLATE).save_pretrained(path)
    return write(path, {"generation_config.json": {"bos_token_id": 0, "eos_token_id": [1, 4]}})


def sentencepiece_style(path: Path) -> Path:
    """Llama 2 / Mistral style: Metaspace BPE with byte fallback (the <0xNN> tokens), a BOS post-processor, and
    the legacy layout: special_tokens_map.json and no added_tokens_decoder; its EOS ``</s>`` is not in
    tokenizer.json, so loading adds it."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    train(tok, ["<unk>", "<s>"], 100, limit_alphabet=40)  # rare characters (CJK, emoji) fall back to bytes
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": PLAIN_TEMPLATE, "clean_up_tokenization_spaces": False,
              "legacy": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    specials = {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False}, "eos_token": "</s>", "unk_token": "<unk>"}
    return write(path, {"tokenizer.json": json.dumps(spec, ensure_ascii=False), "tokenizer_config.json": config,
                        "special_tokens_map.json": specials})


def no_post_processor(path: Path) -> Path:
    """A tokenizer.json without a post-processor next to ``add_bos_token: true``: transformers 5 adds no BOS."""
    tok = byte_level(["<s>", "</s>"])
    return write(path, {"tokenizer.json": tok.to_str(), "tokenizer_config.json": {
        "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}})


KINDS = {"qwen": qwen_style, "llama3": llama3_style, "spm": sentencepiece_style, "no_post": no_post_processor}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: build(root / kind) for kind, build in KINDS.items()}


@pytest.fixture(scope="session")
def pairs(checkpoints) -> dict[str, tuple[HFTokenizer, object]]:
    """kind -> (ours, transformers'), loaded from the same directory."""
    from transformers import AutoTokenizer

    return {kind: (HFTokenizer.from_dir(str(path)), AutoTokenizer.from_pretrained(str(path)))
            for kind, path in checkpoints.items()}


@pytest.fixture(params=list(KINDS))
def pair(request, pairs):
    return pairs[request.param]


# ---- the byte tokenizer ---------------------------------------------------------------------------------------

def test_the_byte_tokenizer_keeps_its_ids_and_module_names():
    assert byte_tokenizer.encode("hé") == BYTES.encode("hé") == [256, 104, 0xC3, 0xA9]
    assert byte_tokenizer.encode("hé", bos=False) == BYTES.encode("hé", add_special_tokens=False) == [104, 0xC3, 0xA9]
    assert byte_tokenizer.BOS == 256 and byte_tokenizer.EOS == 257 and BYTES.stop_ids == {257}
    assert byte_tokenizer.decode([256, 104, 0xC3, 0xA9, 257, 300]) == BYTES.decode([104, 0xC3, 0xA9]) == "hé"
    assert byte_tokenizer.to_bytes([256, 0xC3, 0xA9, 257]) == "é".encode()
    names = {0x41: "A", 0xC3: "bytes:\\xc3", 256: "<|bos|>", 257: "<|eos|>", 300: "<|pad:300|>"}
    assert {t: byte_tokenizer.token_str(t) for t in names} == {t: BYTES.token_str(t) for t in names} == names


def test_the_byte_tokenizer_streams_whole_characters():
    ids = BYTES.encode("a😀é", add_special_tokens=False) + [257]
    stream = BYTES.stream()
    assert [stream.push(t) for t in ids] == ["a", "", "", "", "😀", "", "é", ""] and stream.close() == ""
    stream = BYTES.stream()
    assert stream.push(0xF0) == "" and stream.close() == "\ufffd"  # cut off: what decode() says too


def test_the_byte_tokenizer_renders_its_built_in_chat_template():
    text = BYTES.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert BYTES.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == "<|user|>\nHi\n"


# ---- Hugging Face tokenizers against transformers --------------------------------------------------------------

def test_encode_and_decode_match_transformers(pair):
    ours, ref = pair
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special) == ref(text, add_special_tokens=special)[
                "input_ids"], (text, special)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), \
                    (text, skip)
    assert ours.vocab_size == len(ref)
    assert ours.special_tokens == ref.special_tokens_map


def test_bos_is_what_the_post_processor_adds_not_add_bos_token(pairs):
    ours, ref = pairs["llama3"]
    assert ours.encode("Hi")[0] == ref.bos_token_id == 0 and ours.encode("Hi", add_special_tokens=False)[0] != 0
    ours, ref = pairs["spm"]  # add_bos_token: true, and a post-processor that adds it
    assert ours.encode("Hi")[0] == ref.bos_token_id == 1
    ours, ref = pairs["no_post"]  # add_bos_token: true, no post-processor: transformers 5 adds nothing
    assert ours.encode("Hi") == ours.encode("Hi", add_special_tokens=False) == ref.encode("Hi")
    ours, ref = pairs["qwen"]  # no BOS at all
    assert ours.encode("Hi") == ours.encode("Hi", add_special_tokens=False)


def test_stop_ids_are_eos_and_generation_config_s_eos_token_id(pairs):
    ours, ref = pairs["qwen"]
    assert ours.stop_ids == {ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>")}
    ours, ref = pairs["llama3"]
    assert ours.stop_ids == {ref.eos_token_id, 1} == {4, 1}
    ours, ref = pairs["spm"]  # </s> was not in tokenizer.json: both add it, as a special token, with the same id
    assert ours.stop_ids == {ref.eos_token_id} and ref.eos_token_id == ref.vocab_size
    assert ours.encode("a</s>b", add_special_tokens=False) == ref.encode("a</s>b", add_special_tokens=False)
    assert ours.encode("a</s>b", add_special_tokens=False)[-2] == ref.eos_token_id


def streamed(tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    stream = tokenizer.stream(context)
    return [stream.push(t) for t in ids] + [stream.close()]


def test_streamed_text_is_the_final_decode_and_never_splits_a_character(pair):
    ours, _ = pair
    for text in TEXTS:
        ids = ours.encode(text)
        final = ours.decode(ids, skip_special_tokens=True)
        pieces = streamed(ours, ids)
        assert "".join(pieces) == final, text
        so_far = ""
        for piece in pieces[:-1]:
            so_far += piece
            assert "\ufffd" not in piece and final.startswith(so_far), (text, piece)


def test_a_stream_after_a_prompt_continues_its_text(pair):
    """With the prompt's last tokens as context, the text is what they decode to together, past the prompt's own
    (a SentencePiece word's leading space shows)."""
    ours, _ = pair
    for text in TEXTS:
        context, ids = ours.encode("Say:"), ours.encode(text, add_special_tokens=False)
        whole = ours.decode(context + ids, skip_special_tokens=True)
        assert "".join(streamed(ours, ids, context)) == whole[len(ours.decode(context, skip_special_tokens=True)):]


def test_tokens_that_are_parts_of_a_character_wait_for_the_rest(pairs):
    for kind in ("qwen", "spm"):  # byte-level pieces of an emoji; byte-fallback <0xF0><0x9F><0x98><0x80>
        ours, ref = pairs[kind]
        ids = ours.encode("a😀", add_special_tokens=False)
        parts = [t for t in ids if "\ufffd" in ref.decode([t])]
        assert len(parts) >= 2, kind
        pieces = streamed(ours, ids)
        assert "".join(pieces) == "a😀" and "".join(pieces[: -len(parts) - 1]).endswith("a")
        assert pieces[-len(parts) - 1 :] == [""] * (len(parts) - 1) + ["😀", ""], (kind, pieces)


def test_token_names_and_bytes(pair):
    """The bytes of a text's tokens are its bytes; a token that is part of a character is named by its bytes."""
    ours, ref = pair
    for text in CORPUS:
        ids = ours.encode(text, add_special_tokens=False)
        joined = b"".join(ours.token_bytes(t) for t in ids).decode()
        assert joined == text or joined.lstrip(" ") == text.lstrip(" "), text  # Metaspace marks a leading space
    parts = [t for t in ours.encode("a😀", add_special_tokens=False) if "\ufffd" in ref.decode([t])]
    assert parts and all(ours.token_str(t).startswith("bytes:\\x") for t in parts)
    assert b"".join(ours.token_bytes(t) for t in parts) == "😀".encode()
    for name in ref.all_special_tokens:
        assert ours.token_str(ref.convert_tokens_to_ids(name)) == name


def test_from_dir_reads_any_fsspec_url(checkpoints, pairs):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in checkpoints["qwen"].iterdir():
        fs.pipe(f"/tok-test/qwen/{path.name}", path.read_bytes())
    try:
        remote = HFTokenizer.from_dir("memory://tok-test/qwen")
        ours, _ = pairs["qwen"]
        assert remote.encode(CORPUS[3]) == ours.encode(CORPUS[3]) and remote.stop_ids == ours.stop_ids
        with pytest.raises(FileNotFoundError, match="tokenizer.json"):
            HFTokenizer.from_dir("memory://tok-test/nothing-here")
    finally:
        fs.rm("/tok-test", recursive=True)


# ---- chat templates against apply_chat_template ----------------------------------------------------------------

def test_chat_templates_render_as_apply_chat_template(pair):
    ours, ref = pair
    if ref.chat_template is None:
        with pytest.raises(ChatTemplateError, match="no chat template"):
            ours.render_chat(CONVERSATIONS[0])
        return
    for conversation in CONVERSATIONS:
        for generation_prompt in (True, False):
            text = ours.render_chat(conversation, add_generation_prompt=generation_prompt)
            assert text == ref.apply_chat_template(conversation, tokenize=False,
                                                   add_generation_prompt=generation_prompt), conversation
        ids = ours.encode(ours.render_chat(conversation), add_special_tokens=False)
        assert ids == ref.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_tools_and_tool_calls_render_as_apply_chat_template(pairs):
    ours, ref = pairs["qwen"]
    text = ours.render_chat(TOOL_CONVERSATION, tools=TOOLS)
    assert text == ref.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '"city": {"type": "string", "description": "e.g. Zürich"}' in text  # tojson keeps non-ASCII


def test_a_template_s_raise_exception_is_a_chat_template_error(pairs):
    ours, ref = pairs["llama3"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.render_chat(bad)
    with pytest.raises(Exception, match="roles must alternate"):
        ref.apply_chat_template(bad, tokenize=False)


def test_templates_are_sandboxed():
    from infer.tokenizer import Tokenizer

    class Probe(Tokenizer):
        chat_template = "{{ messages.__class__.__mro__ }}"

    with pytest.raises(ChatTemplateError):
        Probe().render_chat([{"role": "user", "content": "x"}])
    Probe.chat_template = "{% set ns = namespace() %}{% set ns._x = 1 %}"
    with pytest.raises(ChatTemplateError, match="_x"):
        Probe().render_chat([{"role": "user", "content": "x"}])
