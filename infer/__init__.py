"""The inference side: a Llama-style decoder in Paddle running through ``kernels``, its byte tokenizer and
generation (the HTTP server comes with issue 4)."""

from infer.config import CONFIGS, ModelConfig, get_config
from infer.generate import Completion, SamplingParams, complete, stream
from infer.model import Decoder, build_model, load_state, random_state_dict

__all__ = ["CONFIGS", "ModelConfig", "get_config", "Completion", "SamplingParams", "complete", "stream",
           "Decoder", "build_model", "load_state", "random_state_dict"]
