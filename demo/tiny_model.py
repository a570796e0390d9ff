"""A real model family when no weights are at hand: a tiny random Qwen2 directory as Hugging Face lays it out
(``config.json``, ``model.safetensors``, a byte-level BPE ``tokenizer.json`` trained here by ``tokenizers``, its
``tokenizer_config.json`` and ``generation_config.json``), so ``baton demo --model-dir`` runs the same loop through
the same code a real checkpoint takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CORPUS = (
    "The policy answers with digits: 0 1 2 3 4 5 6 7 8 9 10 42 123 2026 31415 271828.",
    "Count for me: one two three, 1 2 3, then 4 5 6 and 7 8 9.",
    "Rollout servers pick up each new version fast, without a memory spike.",
    "Your PIN is 4096; the answer is 17, or 256, or 65536.",
    "Reward comes from digits; text earns nothing. Numbers like 8080 and 1999 do.",
)
EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 176, "max_position_embeddings": 256}


def train_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 8, trainer)
    return tok


def write_tiny_qwen2(path: Path, seed: int = 0, sizes: dict | None = None, dtype: str = "float32") -> Path:
    """Writes the directory (weights in PaddleFormers' ``[in, out]`` layout, which Baton reads as it is);
    ``sizes`` replaces ``SIZES`` (e.g. a larger model of the same family), ``dtype`` ``"bfloat16"`` stores it so."""
    from infer.hf import config_from_hf
    from infer.model import random_state_dict
    from storage.tensorfile import encode_header

    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    eos = tok.token_to_id(EOS)
    doc = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **(sizes or SIZES),
           "vocab_size": -(-tok.get_vocab_size() // 8) * 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "torch_dtype": dtype, "hidden_act": "silu", "bos_token_id": None,
           "eos_token_id": eos}
    state = random_state_dict(config_from_hf(doc, dtype="float32"), seed)
    if dtype == "bfloat16":  # rounded to nearest even, as a cast does
        state = {n: ((v.view(np.uint32) + 0x7FFF + ((v.view(np.uint32) >> 16) & 1)) >> 16).astype(np.uint16)
                 for n, v in state.items()}
    code = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    header = encode_header([(n, code, v.shape, v.nbytes) for n, v in state.items()], {"format": "pd"})
    with open(path / "model.safetensors", "wb") as f:
        f.write(header)
        for value in state.values():
            f.write(np.ascontiguousarray(value).tobytes())
    tok.save(str(path / "tokenizer.json"))
    files = {"config.json": doc, "generation_config.json": {"eos_token_id": eos},
             "tokenizer_config.json": {"eos_token": EOS, "bos_token": None, "pad_token": EOS,
                                       "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
                                       "tokenizer_class": "PreTrainedTokenizerFast"}}
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=1))
    return path
