"""Text <-> token ids for the routes and the engine: one interface, ``Tokenizer``, and two implementations.

- ``ByteTokenizer`` (``BYTES``), the built-in models': token ``i < 256`` is byte ``i``, BOS 256, EOS 257; nothing to
  download and any text round-trips. The module-level ``encode``/``decode``/``to_bytes``/``token_str``/``BOS``/``EOS``
  are this tokenizer's.
- ``HFTokenizer.from_dir(url)``, a Hugging Face checkpoint's ``tokenizer.json`` + ``tokenizer_config.json`` (and
  ``special_tokens_map.json``, ``generation_config.json``, ``chat_template.jinja`` when present) on any fsspec URL,
  run by the ``tokenizers`` library with the same ids and text as ``transformers.AutoTokenizer``.

Both stream text without ever splitting a UTF-8 character (``stream()``), name tokens for logprobs
(``token_str``/``token_bytes``), say which ids end a sample (``stop_ids``), and render chat templates as
``transformers``' ``apply_chat_template`` renders them (``render_chat``).
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

BOS = 256
EOS = 257


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render (or a tokenizer without one); the message says why."""


class Detokenizer:
    """Text of a token stream as it grows: ``push`` returns the text a token completes (a character split over
    several tokens waits for its last one), ``close`` whatever is still held at the end."""

    def push(self, token: int) -> str:
        raise NotImplementedError

    def close(self) -> str:
        raise NotImplementedError


class Tokenizer:
    """What the server needs of a tokenizer. Subclasses set ``vocab_size``, ``stop_ids``, ``chat_template`` and
    ``special_tokens`` (the template's ``bos_token``, ``eos_token``, ...) and fill in the methods that raise."""

    vocab_size: int
    stop_ids: frozenset[int]  # a sample ends when it draws one of these (EOS and generation_config's eos_token_id)
    chat_template: str | dict[str, str] | None = None
    special_tokens: dict[str, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer adds around a text (BOS...)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The bytes ``token`` adds to a text (maybe part of a character); a special token's name."""
        raise NotImplementedError

    def stream(self, context: Sequence[int] = ()) -> Detokenizer:
        """A detokeniser for tokens that follow ``context`` (the prompt's last few tokens, which decide e.g. whether
        a SentencePiece token's leading space shows); special tokens add no text."""
        raise NotImplementedError

    def token_str(self, token: int) -> str:
        """A string that names ``token`` (OpenAI's logprobs keys): its text when that is valid UTF-8 on its own,
        ``bytes:\\xNN...`` otherwise, a special token's name."""
        raw = self.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **kwargs: Any) -> str:
        """The conversation as the chat template renders it, as ``transformers``' ``apply_chat_template(messages,
        tokenize=False, ...)`` does: the special tokens and ``kwargs`` are template variables, messages drop keys
        whose value is None. Raises ``ChatTemplateError``."""
        template = self.chat_template
        if isinstance(template, dict):  # named templates: "tool_use" when tools are given, else "default"
            template = template.get("tool_use" if tools is not None and "tool_use" in template else "default")
        if not template:
            raise ChatTemplateError("this model's tokenizer has no chat template (tokenizer_config.json has no "
                                    "'chat_template' and there is no chat_template.jinja): use /v1/completions")
        conversation = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        import jinja2

        try:
            return compile_chat_template(template).render(
                messages=conversation, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs})
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # raise_exception(), a missing key, a sandbox refusal, a None content added to a string...
            raise ChatTemplateError(f"the chat template cannot render this conversation: {exc}") from None


# ---- the byte tokenizer -----------------------------------------------------------------------------------------

BYTE_CHAT_TEMPLATE = (  # plain text between role markers: the built-in models have no chat special tokens
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


class _Utf8Stream(Detokenizer):
    def __init__(self, to_bytes) -> None:
        self._to_bytes = to_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._to_bytes([token]))

    def close(self) -> str:
        return self._decoder.decode(b"", final=True)


class ByteTokenizer(Tokenizer):
    """Token ``i < 256`` is byte ``i``, then BOS and EOS; special and padding tokens carry no text. Its chat
    template is ``BYTE_CHAT_TEMPLATE`` (no BOS: a chat prompt is its rendered bytes)."""

    vocab_size = 258
    stop_ids = frozenset({EOS})
    chat_template = BYTE_CHAT_TEMPLATE
    special_tokens = {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    @staticmethod
    def to_bytes(ids: Sequence[int]) -> bytes:
        """The bytes of ``ids``; special and padding tokens carry no text and are dropped."""
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.to_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        if 0 <= token < 256:
            return bytes([token])
        return {BOS: "<|bos|>", EOS: "<|eos|>"}.get(token, f"<|pad:{token}|>").encode()

    def stream(self, context: Sequence[int] = ()) -> Detokenizer:
        return _Utf8Stream(self.to_bytes)


BYTES = ByteTokenizer()


def encode(text: str, bos: bool = True) -> list[int]:
    return BYTES.encode(text, add_special_tokens=bos)


def to_bytes(ids: list[int]) -> bytes:
    """The bytes of ``ids``; special and padding tokens carry no text and are dropped."""
    return ByteTokenizer.to_bytes(ids)


def decode(ids: list[int]) -> str:
    return BYTES.decode(ids)


def token_str(token: int) -> str:
    """A string that names ``token`` uniquely (OpenAI's logprobs keys): its character when the byte is valid UTF-8
    on its own, ``bytes:\\xNN`` otherwise, and ``<|bos|>``, ``<|eos|>`` or ``<|pad:N|>`` for special ids."""
    return BYTES.token_str(token)


# ---- Hugging Face tokenizers ------------------------------------------------------------------------------------

NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


class _IncrementalDecode(Detokenizer):
    """Decodes a sliding window: the text of the tokens since the last emitted piece, minus that of the tokens
    before it, emitted once it does not end in a replacement character (a character still incomplete). The
    window's first tokens give context, so decoders that strip a leading space (SentencePiece) strip it once."""

    def __init__(self, decode, context: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(context)
        self._prefix, self._read = 0, len(self._ids)

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]

    def close(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        return self._decode(self._ids[self._prefix :])[len(before) :]


def _clean_up_spaces(text: str) -> str:
    """``transformers``' ``clean_up_tokenization`` (WordPiece-era spaces before punctuation)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer run by the ``tokenizers`` library, set up as ``transformers.AutoTokenizer`` sets
    up its generic fast tokenizer (``TokenizersBackend``):

    - special tokens named in ``tokenizer_config.json`` (or, without ``added_tokens_decoder`` there, in
      ``special_tokens_map.json``) are added to the vocabulary as special tokens when missing;
    - ``add_special_tokens`` adds what ``tokenizer.json``'s post-processor adds: ``add_bos_token`` in
      ``tokenizer_config.json`` is ignored when a ``tokenizer.json`` exists, as ``transformers`` >= 5 ignores it;
    - ``decode`` applies ``clean_up_tokenization_spaces`` except for BPE models, as ``transformers`` does.

    Model-specific tokenizer classes of ``transformers`` (``tokenizer_class`` other than
    ``PreTrainedTokenizerFast``) may rebuild the pipeline from the vocabulary instead; a checkpoint whose
    ``tokenizer.json`` agrees with its class (the usual case) gets the same ids either way.
    """

    def __init__(self, tokenizer_json: str, config: dict | None = None, special_tokens_map: dict | None = None,
                 generation_config: dict | None = None, chat_template: str | None = None, name: str = "") -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as exc:
            raise ImportError(f"{exc}: Hugging Face tokenizers need the tokenizers library: pip install tokenizers") \
                from exc
        config = dict(config or {})
        self.name = name
        spec = json.loads(tokenizer_json)
        tok = Backend.from_str(tokenizer_json)
        tok.no_truncation()
        tok.no_padding()

        declared, named, extras = _special_tokens(config, special_tokens_map, spec)
        _add_special_tokens(tok, declared, named, extras)
        tok.encode_special_tokens = bool(config.get("split_special_tokens", False))

        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {k: str(v) for k, v in named.items()}
        self._added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            model.get("type") != "BPE" or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_"
                                                     "corrupt_output", False))
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self._byte_level = _byte_level_alphabet() if "ByteLevel" in kinds else None
        self._byte_fallback = bool(model.get("byte_fallback"))
        stops = set()
        eos = named.get("eos_token")
        if eos is not None and tok.token_to_id(str(eos)) is not None:
            stops.add(tok.token_to_id(str(eos)))
        generation_eos = (generation_config or {}).get("eos_token_id")
        stops.update(generation_eos if isinstance(generation_eos, list) else
                     [generation_eos] if generation_eos is not None else [])
        self.stop_ids = frozenset(int(i) for i in stops)
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        self.chat_template = template

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"

    @classmethod
    def from_dir(cls, url: str, storage_options: dict | None = None) -> HFTokenizer:
        """The tokenizer of the checkpoint directory at ``url`` (any fsspec URL)."""
        from storage import open_fs

        fs, root = open_fs(url, storage_options)

        def read(name: str) -> str | None:
            try:
                with fs.open(f"{root}/{name}", "rb") as f:
                    return f.read().decode("utf-8")
            except FileNotFoundError:
                return None

        def read_json(name: str) -> dict | None:
            text = read(name)
            try:
                return None if text is None else json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{url}/{name} is not valid JSON: {exc}") from None

        text = read("tokenizer.json")
        if text is None:
            raise FileNotFoundError(f"{url}/tokenizer.json: no such file; a checkpoint directory needs the "
                                    "tokenizer.json of its fast tokenizer (transformers' save_pretrained writes it)")
        return cls(text, read_json("tokenizer_config.json"), read_json("special_tokens_map.json"),
                   read_json("generation_config.json"), read("chat_template.jinja"), name=url)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        text.encode("utf-8")  # a lone surrogate is UnicodeEncodeError here, as for the byte tokenizer
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream(self, context: Sequence[int] = ()) -> Detokenizer:
        return _IncrementalDecode(self._decode_text, context)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per server, the cache lives as long
    def token_bytes(self, token: int) -> bytes:
        if token in self._added:
            return self._added[token].encode()
        piece = self._tok.id_to_token(token)
        if piece is None:  # the model's vocabulary may be larger than the tokenizer's
            return f"<|id:{token}|>".encode()
        if self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        if self._byte_fallback and (m := BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        anchor = self.encode("a", add_special_tokens=False)[:1]  # decoded after a letter: a leading space shows
        return self._decode_text(anchor + [token])[len(self._decode_text(anchor)) :].encode()


def _added_token(value, **override):
    """A ``tokenizers.AddedToken`` from its JSON form (a dict, maybe with ``__type`` and ``id``); a string stays."""
    from tokenizers import AddedToken

    if not isinstance(value, dict):
        return value
    return AddedToken(**{k: v for k, v in value.items() if k not in ("__type", "id")} | override)


def _special_tokens(config: dict, special_tokens_map: dict | None, spec: dict) -> tuple[dict, dict, list]:
    """The special tokens as ``transformers`` reads them: (the declared added tokens by id, the named special
    tokens ``bos_token``... and model-specific ``*_token`` ones, the extra special tokens). Without
    ``added_tokens_decoder`` in the config, ``special_tokens_map.json`` overrides the config (legacy layout) and
    tokenizer.json's added tokens are the declared ones. ``config`` takes the legacy file's entries."""
    if "added_tokens_decoder" in config:
        declared = {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
    else:
        for key, value in (special_tokens_map or {}).items():
            if isinstance(value, list):
                config[key] = [_added_token(t, special=True) for t in value]
            else:
                config[key] = _added_token(value, special=True)
        declared = {t["id"]: _added_token(t) for t in spec.get("added_tokens", [])}
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    named = {k: _added_token(config[k]) for k in NAMED_SPECIALS if config.get(k) is not None}
    if isinstance(extras, dict):  # model-specific named tokens ({"image_token": "<image>"})
        named |= {k: _added_token(v) for k, v in extras.items()}
        extras = []
    named |= {k: v for k, v in config.items()  # other "*_token" strings are named special tokens too
              if k.endswith("_token") and k not in named and isinstance(v, str)}
    by_content = {str(t): t for t in declared.values()}  # a named token keeps its declared properties
    return declared, {k: by_content.get(str(v), v) for k, v in named.items()}, [_added_token(t) for t in extras]


def _add_special_tokens(tok, declared: dict, named: dict, extras: list) -> None:
    """Adds what ``TokenizersBackend.__init__`` adds (declared tokens that differ from tokenizer.json's, then
    special tokens it lacks; strings become special tokens), then what its ``_post_init`` adds again as special
    tokens, in that order: a token missing from the vocabulary gets the id ``transformers`` gives it."""
    from tokenizers import AddedToken

    present = tok.get_added_tokens_decoder().values()
    first = [t for _, t in sorted(declared.items()) if repr(t) not in {repr(p) for p in present}]
    known = {str(p) for p in present} | {str(t) for t in first}
    for t in [*named.values(), *extras]:
        if str(t) not in known:
            first.append(t)
            known.add(str(t))
    names = {str(t) for t in named.values()}
    for i, t in enumerate(first):
        if isinstance(t, str):
            first[i] = AddedToken(t, special=True)
        elif not t.special and str(t) in names:
            t.special = True
    tok.add_tokens(first)
    tok.add_special_tokens([t if isinstance(t, AddedToken) else AddedToken(t, special=True, normalized=False)
                            for t in [*named.values(), *extras]])


# ---- chat templates, rendered as transformers renders them ------------------------------------------------------

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    """A message's reasoning under every name templates read (``reasoning_content``, and ``thinking`` for gpt-oss)."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """The template compiled in ``transformers``' environment: sandboxed and immutable, ``trim_blocks`` and
    ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks (rendered as their body), a ``tojson`` that
    does not escape HTML, and ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; here it is just its
        body, rendered in a call block (its own scope) as in ``transformers``."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Dicts:
        """``dict(...)`` and ``dict.fromkeys(...)``, nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        """Jinja's ``namespace`` without underscore-prefixed attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {key!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=Dicts(), namespace=Namespace)
    return env.from_string(source)
