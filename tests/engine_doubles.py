"""Test doubles of a FastDeploy and an SGLang server: neither engine runs on a CPU-only machine, so these speak
their documented HTTP APIs and load files by their documented rules (written here from the descriptions in
``../shared/CONTEXT.md``, not from their code), holding numpy weights. ``GET /debug/weights`` (a double's own
route) gives the sha256 of every tensor it holds, so tests can check what was loaded byte for byte.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from safetensors.numpy import load_file

PART_INDEX = re.compile(r"\.part(\d+)\.")


def digests(state: dict[str, np.ndarray]) -> dict[str, str]:
    return {n: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for n, a in state.items()}


class FastDeployDouble:
    """A FastDeploy server started with ``--dynamic-load-weight`` (load strategy ``ipc_snapshot``), with one
    worker per entry of ``gpu_ids`` (rank ``r`` on GPU ``gpu_ids[r]``) holding ``shards[r]``.

    Loading, per worker: (1) ``{model_dir}/model_state.tp{rank}.{gpu}.part*.pdparams``, the part number parsed
    with ``\\.part(\\d+)\\.`` (names that do not parse are skipped), sorted by it; (2) ``{base}.pdparams``;
    (3) ``model_state.tp0{gpu}.pdparams``; (4) ``{fallback_dir}/{base}.pdparams``. Each file is read as
    safetensors and applied tensor by tensor: unknown names skipped, a dtype mismatch a TypeError, a shape
    mismatch a ValueError; an error half-way leaves the worker torn, as FastDeploy's loader does.

    ``generation="legacy"`` serves ``GET /clear_load_weight`` and ``GET /update_model_weight`` (200 done or
    already in that state, 400 while updating, 403 while clearing, 404 when loading fails: FastDeploy reports a
    timeout); ``"v1"`` serves ``POST /v1/pause``, ``/v1/update_weights`` (400 unless paused) and ``/v1/resume``.
    ``GET /health`` is 200 while weights are loaded.
    """

    def __init__(self, model_dir: Path, gpu_ids: list[int], shards: list[dict[str, np.ndarray]],
                 generation: str = "legacy", fallback_dir: Path | None = None):
        self.model_dir, self.gpu_ids, self.generation = Path(model_dir), gpu_ids, generation
        self.fallback_dir = fallback_dir or Path("/shared_ipc_meta")
        self.params = [{n: np.array(a) for n, a in s.items()} for s in shards]
        self.status = "normal"  # "normal", "cleared", "updating"
        self.paused = False
        self.fail_next = False  # a test sets it: the next load fails after its first tensor (a torn worker)
        self.calls: list[str] = []
        self.lock = threading.Lock()

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
        for rank, gpu in enumerate(self.gpu_ids):
            params = self.params[rank]
            for path in self.files(rank, gpu):
                state = load_file(str(path))
                if not state:
                    raise ValueError(f"{path}: empty state dict")
                for name, value in state.items():
                    if name not in params:
                        continue
                    if value.dtype != params[name].dtype:
                        raise TypeError(f"{name}: dtype {value.dtype}, parameter is {params[name].dtype}")
                    if value.shape != params[name].shape:
                        raise ValueError(f"{name}: shape {value.shape}, parameter is {params[name].shape}")
                    params[name][...] = value
                    if self.fail_next:
                        self.fail_next = False
                        raise RuntimeError(f"{path}: injected failure after {name}")

    def _load(self) -> tuple[bool, str]:
        self.status = "updating"
        try:
            self.load_all()
        except Exception as exc:  # noqa: BLE001 - reported as FastDeploy does, the worker stays as it is
            self.status = "cleared"
            return False, f"{type(exc).__name__}: {exc}"
        self.status = "normal"
        return True, "ok"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        def health():
            return JSONResponse({}, 200 if self.status == "normal" else 503)

        @app.get("/debug/weights")
        def weights():
            return [digests(p) for p in self.params]

        if self.generation == "legacy":
            @app.get("/clear_load_weight")
            def clear():
                self.calls.append("clear_load_weight")
                if self.status == "updating":
                    return JSONResponse({"message": "updating"}, 400)
                self.status = "cleared"
                return JSONResponse({"message": "cleared"}, 200)

            @app.get("/update_model_weight")
            def update():
                self.calls.append("update_model_weight")
                with self.lock:
                    if self.status == "normal":
                        return JSONResponse({"message": "already normal"}, 200)  # nothing reloaded
                    if self.status == "updating":
                        return JSONResponse({"message": "updating"}, 400)
                    ok, message = self._load()
                return JSONResponse({"message": message}, 200 if ok else 404)
        else:
            @app.post("/v1/pause")
            def pause():
                self.calls.append("pause")
                self.paused = True
                return {"message": "paused"}

            @app.post("/v1/update_weights")
            def update_weights(body: dict = Body(default={})):
                self.calls.append("update_weights")
                if not self.paused:
                    return JSONResponse({"message": "pause the engine first"}, 400)
                with self.lock:
                    ok, message = self._load()
                return JSONResponse({"message": message}, 200 if ok else 500)

            @app.post("/v1/resume")
            def resume():
                self.calls.append("resume")
                self.paused = False
                return {"message": "resumed"}

        return app


ARCH_FIELDS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


class SGLangDouble:
    """An SGLang server started with ``--model-path model_path``: it holds that Hugging Face directory's
    weights, by name and shape (``transformers``' layout, as SGLang's loaders read them).

    ``POST /update_weights_from_disk {model_path, load_format?, weight_version?}`` reads ``config.json`` (the
    architecture must be the one it serves), ``model.safetensors.index.json`` and every safetensors file it lists
    (or ``model.safetensors``), checks every parameter is there with its shape, and only then swaps the weights
    in; on any problem it answers 400 ``{success: false, message}`` and keeps the weights it had.
    ``GET /get_model_info`` reports ``model_path`` and ``weight_version``.
    """

    def __init__(self, model_path: Path):
        self.model_path = str(model_path)
        self.config = json.loads((Path(model_path) / "config.json").read_text())
        self.params = self.read(Path(model_path))
        self.weight_version = "default"

    @staticmethod
    def read(path: Path) -> dict[str, np.ndarray]:
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        state: dict[str, np.ndarray] = {}
        for file in files:
            state.update(load_file(str(path / file)))
        return state

    def update(self, model_path: str, weight_version: str | None) -> tuple[bool, str]:
        path = Path(model_path)
        try:
            config = json.loads((path / "config.json").read_text())
            changed = [f for f in ARCH_FIELDS if config.get(f) != self.config.get(f)]
            if changed:
                return False, f"config.json differs from the served model in {changed}"
            state = self.read(path)
        except (OSError, ValueError, KeyError) as exc:
            return False, f"Failed to load {model_path}: {type(exc).__name__}: {exc}"
        missing = sorted(set(self.params) - set(state))
        wrong = sorted(n for n in set(self.params) & set(state) if state[n].shape != self.params[n].shape)
        if missing or wrong:
            return False, f"Failed to update weights: missing {missing[:3]}, wrong shapes {wrong[:3]}"
        self.params = {n: state[n] for n in self.params}
        self.model_path, self.weight_version = model_path, weight_version or self.weight_version
        return True, "Succeeded to update model weights."

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        def health():
            return {}

        @app.get("/get_model_info")
        def model_info():
            return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                    "preferred_sampling_params": None, "weight_version": self.weight_version}

        @app.post("/update_weights_from_disk")
        def update(body: dict = Body(...)):
            ok, message = self.update(body["model_path"], body.get("weight_version"))
            return JSONResponse({"success": ok, "message": message, "num_paused_requests": 0}, 200 if ok else 400)

        @app.get("/debug/weights")
        def weights():
            return digests(self.params)

        return app
