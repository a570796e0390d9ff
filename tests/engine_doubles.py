"""Test doubles of a FastDeploy and an SGLang server. Neither engine runs on a CPU-only machine, so these speak
their HTTP APIs and load files by the rules of their own code, as read from their sources (cited per class),
never from Baton's export code: the double's state dict layout is written here from FastDeploy's model files.
They hold numpy weights; ``GET /debug/weights`` (a double's own route) gives the sha256 of every tensor held, so
tests check what was loaded byte for byte.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np
from fastapi import Body, FastAPI, Query
from fastapi.responses import JSONResponse, Response
from safetensors import safe_open

log = logging.getLogger("doubles")
PART_INDEX = re.compile(r"\.part(\d+)\.")
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 held as its bit pattern


def digests(state: dict[str, np.ndarray | None]) -> dict[str, str | None]:
    return {n: None if a is None else hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
            for n, a in state.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (bfloat16 as uint16), the way ``paddle.load(path,
    safetensors=True)`` / SGLang's iterator read them: whatever the file's suffix."""
    import torch

    out = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            out[name] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def fastdeploy_shapes(config: dict, tp: int) -> dict[str, tuple[int, ...]]:
    """The ``state_dict()`` of FastDeploy's ``Qwen2ForCausalLMRL`` / ``Qwen3ForCausalLMRL`` on one worker of ``tp``,
    from FastDeploy's sources: ``model_executor/models/qwen2.py`` (``self.qwen2 = Qwen2Model``, ``qkv_proj`` with
    bias, ``o_proj`` input ``hidden_size``, ``up_gate_proj`` output ``2 * intermediate_size``, ``lm_head =
    ParallelLMHead`` always), ``qwen3.py`` (``self.model``, ``qkv_proj`` without bias, ``o_proj`` input
    ``head_dim * num_attention_heads``, ``q_norm``/``k_norm`` of ``head_dim``), ``layers/linear.py`` (``[in, out]``;
    ``QKVParallelLinear`` output ``(num_heads + 2 * kv)·head_dim / tp`` with one kv head per rank when
    ``kv_heads < tp``; ``RowParallelLinear`` divides its input), ``layers/embeddings.py`` + ``layers/utils.py``
    (vocabulary padded to 64, then divided), ``layers/lm_head.py`` (padded to 64 only when ``tp`` does not divide
    it; ``ColumnParallelLinear`` ``[hidden, vocab / tp]``)."""
    arch = config["architectures"][0]
    prefix = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "model"}[arch]
    h, nh, inter, v = (config[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"))
    kvh = config.get("num_key_value_heads", nh)
    hd = config.get("head_dim") or h // nh
    kv_rank = 1 if kvh < tp else kvh // tp
    qkv = (nh // tp + 2 * kv_rank) * hd
    padded = -(-v // 64) * 64
    head = v if v % tp == 0 else padded
    shapes = {f"{prefix}.embed_tokens.embeddings.weight": (padded // tp, h)}
    for i in range(config["num_hidden_layers"]):
        layer = f"{prefix}.layers.{i}"
        shapes[f"{layer}.self_attn.qkv_proj.weight"] = (h, qkv)
        if arch == "Qwen2ForCausalLM":
            shapes[f"{layer}.self_attn.qkv_proj.bias"] = (qkv,)
            shapes[f"{layer}.self_attn.o_proj.weight"] = (h // tp, h)
        else:
            shapes[f"{layer}.self_attn.o_proj.weight"] = (hd * nh // tp, h)
            shapes[f"{layer}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{layer}.self_attn.k_norm.weight"] = (hd,)
        shapes[f"{layer}.mlp.up_gate_proj.weight"] = (h, 2 * inter // tp)
        shapes[f"{layer}.mlp.down_proj.weight"] = (inter // tp, h)
        shapes[f"{layer}.input_layernorm.weight"] = (h,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (h,)
    shapes[f"{prefix}.norm.weight"] = (h,)
    shapes["lm_head.linear.weight"] = (h, head // tp)
    return shapes


class FastDeployDouble:
    """A FastDeploy server started with ``--dynamic-load-weight --load_strategy ipc_snapshot`` from ``model_dir``
    (its ``config.json``), one worker per entry of ``gpu_ids`` (global rank ``r`` on GPU ``gpu_ids[r]``).

    Each worker's parameters are FastDeploy's inference layout (``fastdeploy_shapes``) in the config's dtype,
    empty until a snapshot fills them: like ``DynamicWeightManager.__init__``, the double loads the model dir at
    start and checks every parameter was filled (``finalize_update``), so a server starts only over a snapshot.

    Loading a worker (``fastdeploy/rl/dynamic_weight_manager.py`` ``_update_ipc_snapshot``): (1)
    ``{model_dir}/model_state.tp{rank}.{gpu}.part*.pdparams``, the part number parsed with ``\\.part(\\d+)\\.``
    (names that do not parse skipped), sorted by it; (2) ``{base}.pdparams``; (3) ``model_state.tp0{gpu}.pdparams``
    (all three safetensors content); (4) ``{fallback_dir}/{base}.pdparams``. Each file goes through
    ``_update_model_from_state``: an empty file is a ValueError, **a name the model does not hold is skipped
    silently**, a dtype mismatch is a TypeError, a shape mismatch a ValueError; an error half-way leaves the
    worker torn.

    Routes (``fastdeploy/entrypoints/openai/api_server.py``, ``docs/features/weight_update.md``):

    - ``GET /clear_load_weight`` frees the weights; ``GET /update_model_weight`` reloads, then ``finalize_update``
      raises when a parameter is still empty; 200 when done (also when nothing was to do), 400 while updating,
      404 when it fails (FastDeploy reports a timeout). With ``fd_enable_v1_update_weights`` (the env var
      ``FD_ENABLE_V1_UPDATE_WEIGHTS=1``) these two act as sleep and wakeup.
    - ``generation="v1"`` (FastDeploy >= 2.6) adds ``POST /v1/pause``, ``/v1/resume``, ``GET /v1/is_paused``,
      ``POST /v1/sleep?tags=weight`` (pauses, frees the weights) and ``POST /v1/wakeup?tags=weight``
      (``reload_model_weights`` -> ``_update_ipc_snapshot``, **no completeness check**, resumes by itself), each
      answering ``{"status": "success", ...}``; and ``POST /v1/update_weights``, the rsync/RDMA path
      (``update_weights_by_rdma``): 400 unless paused, and on an ``ipc_snapshot`` server without ``rsync_config``
      an error, never a reload of the model dir.
    - ``GET /health``: 200 while the weights are in place, 304 while they are cleared.
    """

    def __init__(self, model_dir: Path, gpu_ids: list[int], generation: str = "legacy",
                 fallback_dir: Path | None = None, fd_enable_v1_update_weights: bool = False):
        self.model_dir, self.gpu_ids, self.generation = Path(model_dir), gpu_ids, generation
        self.fallback_dir = fallback_dir or Path("/shared_ipc_meta")
        self.v1_routes_legacy = fd_enable_v1_update_weights
        config = json.loads((self.model_dir / "config.json").read_text())
        self.dtype = NUMPY[config.get("torch_dtype", "bfloat16")]
        self.shapes = fastdeploy_shapes(config, len(gpu_ids))
        self.params: list[dict[str, np.ndarray | None]] = [dict.fromkeys(self.shapes) for _ in gpu_ids]
        self.status = "normal"  # "normal", "cleared", "updating"
        self.paused = False
        self.fail_loads = 0  # a test sets it: that many next loads fail after their first tensor (a torn worker)
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.load_all()
        self.finalize_update()  # DynamicWeightManager.__init__: a server starts only over a complete snapshot

    def files(self, rank: int, gpu: int) -> list[Path]:
        base = f"model_state.tp{rank}.{gpu}"
        numbered = []
        for path in glob.glob(str(self.model_dir / f"{base}.part*.pdparams")):
            m = PART_INDEX.search(os.path.basename(path))
            if m:
                numbered.append((int(m.group(1)), Path(path)))
        if numbered:
            return [p for _, p in sorted(numbered)]
        for candidate in (self.model_dir / f"{base}.pdparams", self.model_dir / f"model_state.tp0{gpu}.pdparams",
                          self.fallback_dir / f"{base}.pdparams"):
            if candidate.exists():
                return [candidate]
        raise FileNotFoundError(f"No snapshot found for {base}: checked {self.model_dir} (new/legacy) and "
                                f"{self.fallback_dir}")

    def load_all(self) -> None:
        """``_update_ipc_snapshot`` on every worker."""
        for rank, gpu in enumerate(self.gpu_ids):
            params = self.params[rank]
            for path in self.files(rank, gpu):
                state = read_safetensors(str(path))
                if not state:
                    raise ValueError(f"No parameter found in state dict {state}")
                for name, value in state.items():
                    if name not in params:
                        log.debug("Ignoring unmatched snapshot param: %s", name)  # silently, as FastDeploy does
                        continue
                    if value.dtype != self.dtype:
                        raise TypeError(f"{name}: dtype {value.dtype}, parameter is {np.dtype(self.dtype)}")
                    if value.shape != self.shapes[name]:
                        raise ValueError(f"{name}: shape {value.shape}, parameter is {self.shapes[name]}")
                    params[name] = np.array(value)
                    if self.fail_loads:
                        self.fail_loads -= 1
                        raise RuntimeError(f"{path}: injected failure after {name}")

    def finalize_update(self) -> None:
        """``_verify_parameters("update")``: every parameter must have been filled."""
        empty = [n for p in self.params for n, a in p.items() if a is None]
        if empty:
            raise RuntimeError(f"Model Parameter update verification failed: {empty[:3]} not initialized")

    def clear(self) -> None:
        self.params = [dict.fromkeys(self.shapes) for _ in self.gpu_ids]
        self.status = "cleared"

    def reload(self, check: bool) -> tuple[bool, str]:
        self.status = "updating"
        try:
            self.load_all()
            if check:
                self.finalize_update()
        except Exception as exc:  # noqa: BLE001 - reported as FastDeploy does, the worker stays as it is
            self.status = "cleared"
            return False, f"{type(exc).__name__}: {exc}"
        self.status = "normal"
        return True, "ok"

    def sleep(self) -> None:
        self.paused = True
        self.clear()

    def wakeup(self) -> tuple[bool, str]:
        ok, message = self.reload(check=False)
        if ok:
            self.paused = False
        return ok, message

    def app(self) -> FastAPI:
        app = FastAPI()

        def success(**result):
            return {"status": "success", "message": "ok", "result": result}

        @app.get("/health")
        def health():
            return Response(status_code=200 if self.status == "normal" else 304)

        @app.get("/debug/weights")
        def weights():
            return [digests(p) for p in self.params]

        @app.get("/clear_load_weight")
        def clear():
            self.calls.append("clear_load_weight")
            if self.v1_routes_legacy:
                self.sleep()
                return Response(status_code=200)
            if self.status == "updating":
                return JSONResponse({"msg": "model weight is updating"}, 400)
            self.clear()
            return Response(status_code=200)

        @app.get("/update_model_weight")
        def update():
            self.calls.append("update_model_weight")
            with self.lock:
                if self.v1_routes_legacy:
                    ok, message = self.wakeup()
                elif self.status == "normal":
                    return Response(status_code=200)  # "model weight is updated": nothing reloaded
                else:
                    ok, message = self.reload(check=True)
            return Response(status_code=200) if ok else Response(f"Update model weight timeout ({message})", 404)

        if self.generation == "v1":
            @app.post("/v1/pause")
            def pause():
                self.calls.append("pause")
                self.paused = True
                return success()

            @app.post("/v1/resume")
            def resume():
                self.calls.append("resume")
                self.paused = False
                return success()

            @app.get("/v1/is_paused")
            def is_paused():
                return success(is_paused=self.paused)

            @app.post("/v1/sleep")
            def sleep(tags: str = Query("weight,kv_cache")):
                self.calls.append(f"sleep?tags={tags}")
                if "weight" in tags.split(","):
                    self.sleep()
                return success()

            @app.post("/v1/wakeup")
            def wakeup(tags: str = Query("weight,kv_cache")):
                self.calls.append(f"wakeup?tags={tags}")
                with self.lock:
                    ok, message = self.wakeup() if "weight" in tags.split(",") else (True, "ok")
                return success() if ok else JSONResponse({"status": "error", "message": message}, 500)

            @app.post("/v1/update_weights")
            def update_weights(body: dict = Body(default={})):
                self.calls.append("update_weights")
                if not self.paused:
                    return JSONResponse({"status": "error", "message": "Pause LLM Engine first before calling "
                                         "updating weights"}, 400)
                # update_weights_by_rdma: CheckpointTransfer(**rsync_config, ...) on a server without rsync_config
                return JSONResponse({"status": "error", "message": "TypeError: fastdeploy.rl.CheckpointTransfer() "
                                     "argument after ** must be a mapping, not NoneType"}, 500)

        return app


class SGLangDouble:
    """An SGLang server started with ``--model-path model_path`` (a Hugging Face directory), holding its weights by
    name in ``transformers``' layout, its ``config.json`` read once at start. From SGLang's sources
    (``python/sglang/srt/``):

    - ``POST /update_weights_from_disk {model_path, load_format?, weight_version?, abort_all_requests?}``
      (``entrypoints/http_server.py``; 200 ``{success: true, message, num_paused_requests}`` or 400 with
      ``success: false``) runs ``model_executor/model_runner.py`` ``update_weights_from_disk``: it sets the model
      config's ``model_path`` to the new path **first**; an unreadable directory fails with the weights untouched;
      then ``model.load_weights`` copies the tensors one by one (``models/qwen2.py``: a tied ``lm_head.weight`` and
      names the model does not hold are skipped with a log line, so **missing tensors keep their old values**;
      ``default_weight_loader`` asserts each shape). An exception half-way answers "Rolling back to original
      weights" but re-reads the **new** path, so the tensors copied before the failure stay: a partial model.
      The new path's ``config.json`` is never read.
    - On success (``managers/tokenizer_manager.py``) ``model_path`` and ``served_model_name`` become the new path
      (``/v1/models`` lists it) and ``weight_version`` the one given.
    - ``GET /model_info`` (``/get_model_info``, deprecated) reports ``model_path``, ``weight_version``,
      ``model_type``, ``architectures``...
    """

    def __init__(self, model_path: Path):
        self.model_path = self.served_model_name = self.config_path = str(model_path)
        self.config = json.loads((Path(model_path) / "config.json").read_text())
        self.params = dict(self.weights(Path(model_path)))
        self.weight_version = "default"
        self.calls: list[dict] = []
        self.fail_loads = 0  # a test sets it: that many next loads raise after their first tensor

    @staticmethod
    def weight_files(path: Path) -> list[Path]:
        """``DefaultModelLoader._prepare_weights``: the top-level ``*.safetensors``, filtered by the index."""
        files = sorted(path.glob("*.safetensors"))
        index = path / "model.safetensors.index.json"
        if index.exists():
            listed = set(json.loads(index.read_text())["weight_map"].values())
            files = [f for f in files if f.name in listed]
        if not files:
            raise RuntimeError(f"Cannot find any model weights with `{path}`")
        return files

    @classmethod
    def weights(cls, path: Path):
        for file in cls.weight_files(path):
            yield from read_safetensors(str(file)).items()

    @classmethod
    def read(cls, path: Path) -> dict[str, np.ndarray]:
        return dict(cls.weights(path))

    def load_weights(self, path: Path) -> None:
        """``Qwen2ForCausalLM.load_weights`` over the new path's tensors, in place, one by one."""
        for name, value in self.weights(path):
            if self.config.get("tie_word_embeddings") and name == "lm_head.weight":
                continue
            if name not in self.params:
                log.warning("Parameter %s not found in params_dict", name)
                continue
            if value.shape != self.params[name].shape:
                raise AssertionError(f"Attempted to load weight ({value.shape}) into parameter "
                                     f"({self.params[name].shape})")
            self.params[name] = np.array(value)
            if self.fail_loads:
                self.fail_loads -= 1
                raise RuntimeError(f"injected failure after {name}")

    def update(self, model_path: str, weight_version: str | None) -> tuple[bool, str]:
        self.config_path = model_path  # model_config.model_path, switched before anything is loaded
        try:
            self.weight_files(Path(model_path))
        except Exception as exc:  # noqa: BLE001
            return False, f"Failed to get weights iterator: {exc}."
        try:
            self.load_weights(Path(model_path))
        except Exception as exc:  # noqa: BLE001
            message = f"Failed to update weights: {exc}.\nRolling back to original weights."
            try:
                self.load_weights(Path(self.config_path))  # the "rollback" reads model_config.model_path: the new one
            except Exception:  # noqa: BLE001 - fails the same way, after the same tensors were copied again
                pass
            return False, message
        self.model_path = self.served_model_name = model_path
        message = "Succeeded to update model weights."
        if weight_version is not None:
            self.weight_version = weight_version
            message += f" Weight version updated to {weight_version}."
        return True, message

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        def health():
            return {}

        def info():
            return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                    "preferred_sampling_params": None, "weight_version": self.weight_version,
                    "has_image_understanding": False, "has_audio_understanding": False,
                    "model_type": self.config.get("model_type"), "architectures": self.config.get("architectures")}

        app.get("/model_info")(info)
        app.get("/get_model_info")(info)

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": self.served_model_name, "object": "model"}]}

        @app.post("/update_weights_from_disk")
        def update(body: dict = Body(...)):
            self.calls.append(body)
            ok, message = self.update(body["model_path"], body.get("weight_version"))
            return JSONResponse({"success": ok, "message": message, "num_paused_requests": 0}, 200 if ok else 400)

        @app.get("/debug/weights")
        def weights():
            return digests(self.params)

        return app
