"""A contender's worker process for ``pocketsd bench`` (the protocol: worker_protocol.py).

    python -m pocketsd.bench.worker '{"kind": "pocketsd", "bundle": "...", "engine": "openvino", "threads": 0, ...}'

Kinds, each a model loaded the way its users load it, fed the same UNet inputs:
- ``pocketsd``: a bundle through ``Pipeline.from_bundle`` (every component's sessions opened, resident), on the
  bundle's engine of choice; a UNet call is the bundle's chunk chain, timed chunk by chunk. With ``"fresh_cache":
  true`` its per-user cache folder is a new, empty one (``_fresh_cache``): a machine that never opened the bundle;
- ``onnxruntime``: one ONNX file in a plain ``InferenceSession`` (default options, the bench's thread count): what a
  user of an unchunked export gets without pocketsd;
- ``openvino``: the same file compiled by a plain OpenVINO ``Core`` (default options, the bench's thread count);
- ``diffusers``: diffusers' ``StableDiffusionPipeline`` on PyTorch, fp32, CPU.
optimum's pipeline has its own worker (optimum_worker.py), as it may run in another Python environment.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from pocketsd.bench.worker_protocol import Handler, serve, timed, timed_call, unet_inputs
from pocketsd.contract import UNET_IO

Spec = dict[str, Any]


def _inputs(spec: Spec) -> dict[str, np.ndarray]:
    """The shared UNet inputs; text states as (B, C, 1, S) for a bundle exported in that layout (``bc1s``)."""
    feeds = unet_inputs(spec["latent_height"], spec["latent_width"], spec["unet_batch"], spec["latent_channels"],
                        spec["text_length"], spec["text_hidden"])
    if spec.get("context_layout") == "bc1s":
        states = feeds[UNET_IO.encoder_hidden_states]
        feeds[UNET_IO.encoder_hidden_states] = np.ascontiguousarray(states.transpose(0, 2, 1)[:, :, None, :])
    return feeds


def _threads(spec: Spec) -> int:
    return int(spec.get("threads") or 0)


def _fresh_cache(spec: Spec) -> None:
    """Point pocketsd's cache folder (XDG_CACHE_HOME) at a new, empty folder, removed when the worker exits. It is
    made beside the bundle, not in /tmp: that is often a tmpfs (memory), and faster to write than the disk where a
    user's cache lives."""
    folder = tempfile.mkdtemp(prefix=".fresh-cache-", dir=os.path.dirname(os.path.abspath(spec["bundle"])))
    os.environ["XDG_CACHE_HOME"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def pocketsd_worker(spec: Spec) -> dict[str, Handler]:
    import pocketsd
    from pocketsd.runtime.pipeline import Pipeline

    if spec.get("fresh_cache"):
        _fresh_cache(spec)
    state: dict[str, Any] = {}

    def load(_request: dict[str, Any]) -> dict[str, Any]:
        if "pipe" in state:
            state.pop("pipe").close()
        start = time.perf_counter()
        pipe = Pipeline.from_bundle(spec["bundle"], threads=_threads(spec) or None, engine=spec["engine"],
                                    memory="resident")
        for component in pipe.manifest.components:
            pipe.runner(component)
        state["pipe"], state["feeds"] = pipe, _inputs(spec)
        return {"seconds": time.perf_counter() - start}

    def call(request: dict[str, Any]) -> dict[str, Any]:
        runner = state["pipe"].runner("unet")
        chunks: list[dict[str, Any]] = []
        run = runner.policy.run

        def timed_run(chunk: Any, following: Any, feeds: Any) -> Any:
            start = time.perf_counter()
            outputs = run(chunk, following, feeds)
            chunks.append({"id": chunk.id, "seconds": time.perf_counter() - start})
            return outputs

        runner.policy.run = timed_run  # type: ignore[method-assign]  # the bench's own instance, restored below
        try:
            answer = timed_call(lambda: runner(**state["feeds"]), request, lambda out: out[UNET_IO.noise_pred])
        finally:
            del runner.policy.run
        return {**answer, "chunks": chunks}

    def generate(request: dict[str, Any]) -> dict[str, Any]:
        pipe = state["pipe"]
        return {"seconds": timed(lambda: pipe(request["prompt"], num_inference_steps=request["steps"],
                                                 guidance_scale=request["guidance"], scheduler="euler",
                                                 seed=request["seed"], output_type="np"))}

    def info(_request: dict[str, Any]) -> dict[str, Any]:
        engines = ("openvino",) if spec["engine"].startswith("openvino") else ()
        return {"versions": _versions("numpy", "onnxruntime", *engines, pocketsd=pocketsd.__version__),
                "describe": f"pocketsd Pipeline on {spec['engine']}"}

    return {"load": load, "call": call, "generate": generate, "info": info}


def onnxruntime_worker(spec: Spec) -> dict[str, Handler]:
    import onnxruntime as ort

    state: dict[str, Any] = {}

    def load(_request: dict[str, Any]) -> dict[str, Any]:
        state.pop("session", None)
        start = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads(spec)
        state["session"] = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
        state["feeds"] = _inputs(spec)
        return {"seconds": time.perf_counter() - start}

    def call(request: dict[str, Any]) -> dict[str, Any]:
        return timed_call(lambda: state["session"].run(None, state["feeds"]), request, lambda out: out[0])

    def info(_request: dict[str, Any]) -> dict[str, Any]:
        return {"versions": _versions("numpy", "onnxruntime"),
                "describe": "onnxruntime InferenceSession, default options, on the unchunked ONNX file"}

    return {"load": load, "call": call, "info": info}


def openvino_worker(spec: Spec) -> dict[str, Handler]:
    import openvino

    state: dict[str, Any] = {}

    def load(_request: dict[str, Any]) -> dict[str, Any]:
        state.pop("request", None)
        start = time.perf_counter()
        config = {"INFERENCE_NUM_THREADS": _threads(spec)} if _threads(spec) else {}
        compiled = openvino.Core().compile_model(spec["onnx"], "CPU", config)
        state["request"], state["feeds"] = compiled.create_infer_request(), _inputs(spec)
        return {"seconds": time.perf_counter() - start}

    def call(request: dict[str, Any]) -> dict[str, Any]:
        return timed_call(lambda: state["request"].infer(state["feeds"]), request,
                          lambda out: next(iter(out.values())))

    def info(_request: dict[str, Any]) -> dict[str, Any]:
        return {"versions": _versions("numpy", "openvino"),
                "describe": "OpenVINO Core.compile_model on CPU, default options, on the unchunked ONNX file"}

    return {"load": load, "call": call, "info": info}


def diffusers_worker(spec: Spec) -> dict[str, Handler]:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.set_num_threads(_threads(spec) or os.cpu_count() or 1)
    state: dict[str, Any] = {}

    def load(_request: dict[str, Any]) -> dict[str, Any]:
        state.pop("pipe", None)
        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        state["pipe"] = pipe
        state["feeds"] = {k: torch.from_numpy(v) for k, v in _inputs(spec).items()}
        return {"seconds": time.perf_counter() - start}

    def call(request: dict[str, Any]) -> dict[str, Any]:
        unet, feeds = state["pipe"].unet, state["feeds"]
        with torch.inference_mode():
            return timed_call(lambda: unet(feeds[UNET_IO.sample], feeds[UNET_IO.timestep],
                                           encoder_hidden_states=feeds[UNET_IO.encoder_hidden_states]),
                              request, lambda out: out.sample.numpy())

    def generate(request: dict[str, Any]) -> dict[str, Any]:
        pipe = state["pipe"]
        generator = torch.Generator().manual_seed(request["seed"])
        with torch.inference_mode():
            return {"seconds": timed(lambda: pipe(request["prompt"], num_inference_steps=request["steps"],
                                                  guidance_scale=request["guidance"], height=spec["height"],
                                                  width=spec["width"], generator=generator, output_type="np"))}

    def info(_request: dict[str, Any]) -> dict[str, Any]:
        import diffusers

        threads = torch.get_num_threads()
        return {"versions": _versions("numpy", "transformers", torch=torch.__version__,
                                      diffusers=diffusers.__version__),
                "describe": f"diffusers StableDiffusionPipeline on PyTorch CPU fp32, {threads} threads"}

    return {"load": load, "call": call, "generate": generate, "info": info}


def _versions(*modules: str, **known: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = dict(known)
    for name in modules:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


KINDS: dict[str, Callable[[Spec], dict[str, Handler]]] = {
    "pocketsd": pocketsd_worker, "onnxruntime": onnxruntime_worker, "openvino": openvino_worker,
    "diffusers": diffusers_worker,
}


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    try:
        handlers = KINDS[spec["kind"]](spec)
    except ImportError as exc:  # the contender's package is missing: every request says so, in one line
        handlers = _unavailable(f"{exc.name or exc} is not installed")
    return serve(handlers)


def _unavailable(reason: str) -> dict[str, Handler]:
    def fail(_request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError(reason)

    return {op: fail for op in ("load", "call", "generate", "info")}


if __name__ == "__main__":
    sys.exit(main())
